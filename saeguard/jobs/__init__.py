"""The commands' orchestration: each job reads its config, runs library code, writes its
outputs under ``--out`` (atomically, resumably, through :class:`saeguard.steps.Step`) and hands
documents to :mod:`saeguard.report` to render. Nothing in the library imports this package.

- :mod:`~saeguard.jobs.harvest`: `saeguard harvest` (activation cache)
- :mod:`~saeguard.jobs.train`: `saeguard train`
- :mod:`~saeguard.jobs.eval`: `saeguard eval`; :mod:`~saeguard.jobs.compare`: `saeguard compare`
- :mod:`~saeguard.jobs.ood`: `saeguard ood fit` and `saeguard ood benchmark`
- :mod:`~saeguard.jobs.robustify`: `saeguard robustify`
- :mod:`~saeguard.jobs.run`: `saeguard run` (sized by :mod:`~saeguard.jobs.planning`)
- :mod:`~saeguard.jobs.studies`: `saeguard study masking`
"""

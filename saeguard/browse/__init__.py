"""The feature browser's data: one pass over held-out text collects, per latent, its firing rate,
histogram, top-activating contexts and samples from several activation quantiles; logit effects
and decoder neighbours come from the weights (``saeguard browse``, docs/browse.md). The site
itself is rendered by :mod:`saeguard.report.browser_site`."""

from saeguard.browse.build import FORMAT, FORMAT_VERSION, MonitorColumns, build_document
from saeguard.browse.collect import CollectConfig, Collection, read_held_out
from saeguard.browse.logits import LogitEffects, decoder_neighbours, logit_effects

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CollectConfig",
    "Collection",
    "LogitEffects",
    "MonitorColumns",
    "build_document",
    "decoder_neighbours",
    "logit_effects",
    "read_held_out",
]

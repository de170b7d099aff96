"""The ``saeguard`` command line: a table of commands.

Each command names its config (from :mod:`saeguard.jobs`), whose fields become its options (see
:mod:`saeguard.configs`; nested configs give ``--sub.name`` and, when unambiguous, ``--name``),
and a handler that runs the job and prints its summary. ``--help`` always matches the Python API.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saeguard import __version__
from saeguard.configs import add_config_arguments, config_from_args
from saeguard.distributed import is_main_process, launched_world_size, leave_world
from saeguard.errors import SaeguardError, describe_os_error
from saeguard.fileio import release_output_locks

log = logging.getLogger("saeguard")


# --- handlers: run a job on its config, print its summary ------------------------------------
def _harvest(cfg: Any) -> int:
    from saeguard.jobs.harvest import harvest

    cache = harvest(cfg)
    if not is_main_process():
        return 0
    summary = {
        "out": str(cache.directory),
        "hooks": {h: cache.n_tokens(h) for h in cache.hooks},
        "shards": len(cache.shards),
        "complete": cache.complete,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _train(cfg: Any) -> int:
    from saeguard.jobs.train import run_training

    results = run_training(cfg)
    if is_main_process():
        print(json.dumps(results, indent=2))
    return 0


def _eval(job: Any) -> int:
    from saeguard.jobs.eval import run_eval

    cfg = job.eval
    document = run_eval(job.sae_dir, cfg)
    out = cfg.out or (f"{cfg.adapter}/eval" if cfg.adapter else job.sae_dir)
    summary = {name: m["value"] for name, m in document["metrics"].items()}
    print(json.dumps({"eval_json": f"{out}/eval.json", "eval_html": f"{out}/eval.html",
                      "complete": document["complete"], "metrics": summary}, indent=2))  # fmt: skip
    return 0


def _compare(cfg: Any) -> int:
    from saeguard.jobs.compare import compare

    result = compare(cfg.directories, cfg.out, cfg.metrics, cfg.seed)
    print(result.terminal)
    if cfg.markdown:
        print()
        print(result.markdown)
    return 0


def _study_masking(cfg: Any) -> int:
    from saeguard.jobs.studies import run_study

    document = run_study(cfg)
    print(f"{cfg.out}/study.md, {cfg.out}/study.html, {cfg.out}/study.json")
    print("finding:", document["finding"])
    return 0


def _study_probing(cfg: Any) -> int:
    from saeguard.jobs.probing_study import run_probing_study

    document = run_probing_study(cfg)
    print(f"{cfg.out}/probing_study.md, {cfg.out}/probing_study.html, {cfg.out}/probing_study.json")
    print("finding:", document["finding"])
    return 0


def _ood_fit(cfg: Any) -> int:
    from saeguard.devices import describe_device
    from saeguard.jobs.ood import fit_monitor

    monitor = fit_monitor(cfg)
    flag = cfg.monitor.flag_score
    summary = {
        "monitor": cfg.out,
        "device": describe_device(monitor.device),
        "id_tokens": monitor.stats.n_tokens,
        "id_texts": monitor.stats.n_texts,
        "flag_score": flag,
        "threshold": monitor.thresholds.get(flag),
        "calibration": monitor.calibration,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _read_texts(cfg: Any) -> list[str | bytes]:
    """Texts from the arguments, else from --file (or stdin), as raw bytes when read from a file
    so that invalid UTF-8 is reported per text instead of failing the whole input."""
    if cfg.texts:
        return list(cfg.texts)
    data = sys.stdin.buffer.read() if cfg.file in ("", "-") else _read_bytes(cfg.file)
    if cfg.input_format == "whole":
        return [data]
    if cfg.input_format == "jsonl":
        texts: list[str | bytes] = []
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                texts.append(str(record["text"]) if isinstance(record, dict) else str(record))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as exc:
                raise SaeguardError(
                    f"line {number} of the input is not a JSON object with a 'text' field ({exc})"
                ) from exc
        return texts
    return [line for line in data.splitlines() if line.strip()]


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SaeguardError(f"cannot read {path}: {exc.strerror}") from exc


def _ood_score(cfg: Any) -> int:
    from saeguard.jobs.ood import score_texts

    texts = _read_texts(cfg)  # bad input fails before the model loads
    for row in score_texts(cfg, texts):  # under torchrun: every rank's rows, on rank 0 only
        print(json.dumps(row, ensure_ascii=False))
    return 0


def _serve(cfg: Any) -> int:
    from saeguard.jobs.serve import serve

    serve(cfg)
    return 0


def _ood_benchmark(job: Any) -> int:
    from saeguard.jobs.ood import run_benchmark
    from saeguard.report.ood_report import summary_sentences

    document = run_benchmark(job.monitor, job.out, job.benchmark, job.device, job.site)
    print(f"{job.out}/ood_benchmark.json, ood_benchmark.md, ood_report.html, examples.html")
    cal = document["calibration"]
    print(f"measured FPR {cal['measured_fpr']:.3f} (target {cal['target_fpr']})")
    for sentence in summary_sentences(document):
        print(sentence)
    return 0


def _robustify(cfg: Any) -> int:
    from saeguard.jobs.robustify import run_robustify
    from saeguard.report.robustify_report import summary_sentence

    document = run_robustify(cfg)
    print(f"{cfg.out}/robustify.json, {cfg.out}/robustify.html, adapter: {cfg.out}/robust/adapter")
    print(summary_sentence(document))
    return 0


def _run(cfg: Any) -> int:
    from saeguard.jobs.run import run

    state = run(cfg)
    if is_main_process():
        print(f"report: {state['report']}")
    return 0


def _browse(cfg: Any) -> int:
    from saeguard.jobs.browse import run_browse

    summary = run_browse(cfg)
    print(json.dumps({
        "site": f"{cfg.out}/index.html",
        "latents": summary["d_sae"],
        "tokens_read": summary["tokens_read"],
        "dead": summary["dead"],
        "dense": summary["dense"],
        "index_bytes": summary["index_bytes"],
        "site_bytes": summary["site_bytes"],
        "seconds": summary["timings_s"]["wall"],
    }, indent=2))  # fmt: skip
    return 0


def _cache(cfg: Any) -> int:
    from saeguard.activations import ActivationCache

    cache = ActivationCache.open(cfg.directory)
    if cfg.verify:
        cache.verify()
    manifest = cache.manifest
    summary = {
        "directory": str(cache.directory),
        "model": manifest["model"],
        "corpus": manifest["corpus"],
        "split": manifest["split"],
        "dtype": manifest["dtype"],
        "cache_dtype": manifest["cache_dtype"],
        "hooks": {h: cache.n_tokens(h) for h in cache.hooks},
        "tokens_per_hook": manifest["tokens_per_hook"],
        "shards": len(cache.shards),
        "bytes": sum(int(s["bytes"]) for s in cache.shards),
        "complete": cache.complete,
        "verified": bool(cfg.verify),
        "exclusions": manifest["exclusions"],
    }
    print(json.dumps(summary, indent=2))
    return 0


def _hooks(cfg: Any) -> int:
    import torch

    from saeguard.devices import resolve_device
    from saeguard.models import capture_hooks, load_model

    loaded = load_model(cfg.model, device=resolve_device(cfg.device))
    model: Any = loaded.model
    tokenizer: Any = loaded.tokenizer
    points = [loaded.hook_point(h) for h in loaded.hook_names()]
    probe = torch.tensor([tokenizer("Hello world")["input_ids"] or [0]], dtype=torch.long)
    probe = probe.to(loaded.device)
    with torch.inference_mode(), capture_hooks(model, points, stop_early=False) as store:
        model.base_model(input_ids=probe, use_cache=False)
    if cfg.json:
        print(json.dumps({p.name: list(store[p.name].shape[2:]) for p in points}, indent=2))
        return 0
    print(f"{loaded.name}: {loaded.family}, {loaded.n_layers} layers, d_model={loaded.d_model}")
    print(f"{'hook point':<16} shape")
    for point in points:
        shape = ", ".join(str(s) for s in store[point.name].shape[2:])
        print(f"{point.name:<16} [batch, seq, {shape}]")
    return 0


def _corpora(cfg: Any) -> int:
    from saeguard.data import CORPORA, load_corpus

    rows = []
    for name, info in CORPORA.items():
        try:
            corpus = load_corpus(name)
            size = f"{len(corpus.documents):>6} docs {corpus.n_chars / 1e6:>6.2f}M chars"
            status = "ok"
        except SaeguardError as exc:
            size, status = f"{'-':>6} docs {'-':>6}  chars", f"missing: {exc}".splitlines()[0]
        rows.append((name, size, info.labels or "-", info.license, info.source, status))
    if cfg.json:
        keys = ("name", "size", "labels", "license", "source", "status")
        print(json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=2))
        return 0
    for name, size, labels, lic, source, status in rows:
        print(f"{name:<18} {size}  labels: {labels}")
        print(
            f"{'':<18} source: {source}; license: {lic}" + ("" if status == "ok" else f"; {status}")
        )
    print(
        "\nAlso accepted as --corpus: a .txt file (blank-line separated documents), a .jsonl "
        "file (field 'text', optional 'label'), a .csv file (column 'text'), or "
        "hf:DATASET[:CONFIG][@SPLIT]."
    )
    return 0


# --- the table ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Command:
    """One sub-command: its words, its texts, the config its options come from, its handler."""

    path: tuple[str, ...]
    """Words after ``saeguard`` (``("ood", "fit")``)."""
    help: str
    """One line in the parent's command list."""
    description: str
    """The paragraph at the top of its ``--help``."""
    config: type
    """Config dataclass whose fields are the options."""
    run: Callable[[Any], int]
    """Runs the job on the built config; returns the exit status."""
    positional: tuple[str, ...] = ()
    """Fields given as positional arguments."""
    aliases: dict[str, list[str]] = field(default_factory=dict)
    """Extra flags of fields, by dotted name (e.g. the flags they had before configs nested)."""
    exclude: tuple[str, ...] = ()
    """Fields that are not options (decided by the job or following another setting)."""
    distributed: bool = False
    """Whether it runs data-parallel under ``torchrun`` (the others refuse to start there)."""


GROUPS: dict[tuple[str, ...], tuple[str, str]] = {
    ("study",): ("Reproducible studies: `study masking` (masked regularization), `study probing` "
                 "(SAE probes vs baselines in four regimes).",
                 "Studies that train or evaluate SAEs and write a report."),
    ("ood",): ("Detect out-of-distribution inputs: fit a monitor, score texts, benchmark it.",
               "The OOD monitor of SPEC section 5: fallacious SAE latents (rare or out of range "
               "on in-distribution text, weighted by their surprisal), reconstruction error, L0 "
               "shift, Mahalanobis, k-NN and LM-confidence baselines, fused into one score by "
               "their p-values against held-out in-distribution text (the default flag)."),
}  # fmt: skip
"""Words that only group sub-commands: (help, description)."""


def commands() -> list[Command]:
    """Every sub-command, in ``--help`` order."""
    from saeguard.jobs.browse import BrowseConfig
    from saeguard.jobs.compare import CompareConfig
    from saeguard.jobs.eval import EvalConfig, EvalJobConfig
    from saeguard.jobs.harvest import HarvestConfig
    from saeguard.jobs.info import CacheInfoConfig, CorporaConfig, HooksConfig
    from saeguard.jobs.ood import OodBenchmarkJobConfig, OodFitConfig, OodScoreConfig
    from saeguard.jobs.probing_study import ProbingStudyConfig
    from saeguard.jobs.robustify import RobustifyConfig
    from saeguard.jobs.run import RunConfig
    from saeguard.jobs.serve import ServeConfig
    from saeguard.jobs.studies import MaskingStudyConfig
    from saeguard.jobs.train import TrainJobConfig

    eval_aliases = {f"eval.{k}": v for k, v in EvalConfig.CLI_ALIASES.items()}
    eval_followed = tuple(f"eval.{k}" for k in EvalConfig.FOLLOWED)
    return [
        Command(
            path=("run",),
            help="The main job end to end: train a masked SAE, evaluate, fit the OOD monitor, "
            "benchmark, report.",
            description=(
                "On the embedded default (SmolLM2-135M + wiki-en) or any model and corpus: "
                "harvest activations and train a masked TopK SAE, evaluate it (core + CE), fit and "
                "calibrate the OOD monitor, run the OOD benchmark and write OUT/index.html linking "
                "every report. Progress bars throughout; running the same command again after an "
                "interruption resumes instead of starting over. Under torchrun the harvest and "
                "the training are data-parallel and rank 0 does the rest (docs/scaling.md)."
            ),
            distributed=True,
            config=RunConfig,
            run=_run,
            exclude=RunConfig.PLANNED,
        ),
        Command(
            path=("harvest",),
            help="Cache a model's activations at one or more hook points.",
            description=(
                "Run the model over a corpus split and cache the activations at the given hook "
                "points in a sharded, checksummed directory. The forward pass stops after the "
                "deepest hook. Special tokens and norm outliers are excluded by default. Running "
                "the same command again after an interruption resumes where it stopped. Under "
                "torchrun each rank writes its own shards (shard i is rank i mod N's) into the "
                "one cache, whose manifest lists them all: the cache equals one process's."
            ),
            distributed=True,
            config=HarvestConfig,
            run=_harvest,
            aliases={"hooks": ["--hook"]},
        ),
        Command(
            path=("train",),
            help="Train one or several SAEs, straight from the model or from a harvest cache.",
            description=(
                "Train SAEs on a model's activations at one hook point. Several --arch, --k or "
                "--expansion values train several SAEs from one activation stream in one pass. "
                "Masked regularization (--mask-prob) replaces input tokens by a mask token before "
                "the model runs. Checkpoints every --checkpoint-every steps: running the same "
                "command again resumes with bit-identical results. Writes cfg.json + "
                "sae_weights.safetensors (SAELens-compatible), metrics.jsonl and "
                "train_results.json. Architecture settings (e.g. --jumprelu-bandwidth) go to "
                "every trained architecture that has them. Data-parallel under torchrun "
                "(`torchrun --nproc-per-node N -m saeguard train ...`): each rank computes its "
                "share of the activations and trains on its share of every global batch; the "
                "result equals one process's (docs/scaling.md)."
            ),
            distributed=True,
            config=TrainJobConfig,
            run=_train,
            aliases={"hooks": ["--hook"], "architectures": ["--arch"]},
        ),
        Command(
            path=("eval",),
            help="Evaluate an SAE: reconstruction, CE recovered, absorption, probing, OOD probing.",
            description=(
                "Run benchmark metrics (SPEC section 4) on one SAE directory and write eval.json "
                "(validated against saeguard/jobs/eval.schema.json), eval_samples.json (per-unit "
                "values for `saeguard compare`) and a self-contained eval.html with plots. The "
                "model, hook and exclusion rules come from the SAE's cfg.json; text comes from "
                "held-out splits. Finished evals are kept: re-running the same command resumes."
            ),
            config=EvalJobConfig,
            run=_eval,
            positional=("sae_dir",),
            aliases=eval_aliases,
            exclude=eval_followed,
        ),
        Command(
            path=("compare",),
            help="Compare evaluated SAEs side by side, with bootstrap intervals on differences.",
            description=(
                "Read the eval.json of each directory and print a side-by-side table. Each column "
                "after the first shows its difference from the first SAE with a bootstrap 95%% "
                "interval (paired over the same contexts, tasks or letters when both SAEs were "
                "scored on the same ones). Writes compare.html (and compare.md) to --out."
            ),
            config=CompareConfig,
            run=_compare,
            positional=("directories",),
        ),
        Command(
            path=("study", "masking"),
            help="Baseline vs masked SAEs: absorption, probing, OOD gap, fidelity.",
            description=(
                "Train SAEs of each --archs architecture (TopK by default; matryoshka is the "
                "paper's) with masked regularization (each --mask-probs value; 0 is the "
                "baseline) at each --ks sparsity with --seeds seeds on the same activation budget, "
                "evaluate them on the same held-out text and write study.md, study.html and "
                "study.json: mean full absorption, absorption fraction, sparse probing (k=1, 5), "
                "OOD probing AUC and gap, explained variance, CE loss recovered - means over seeds "
                "with bootstrap intervals and paired differences from the baseline. Re-running "
                "resumes: finished SAEs and evaluations are kept."
            ),
            config=MaskingStudyConfig,
            run=_study_masking,
            aliases=eval_aliases,
            exclude=(*MaskingStudyConfig.EVAL_OWN, *eval_followed),
        ),
        Command(
            path=("study", "probing"),
            help="SAE probes vs strong baselines in four regimes (scarcity, imbalance, noise, "
            "shift).",
            description=(
                "After Kantamneni et al. 2025 (SPEC section 7): binary tasks (wiki-en and BBC "
                "topics, language ID, plain vs jailbreak-wrapped questions, and your --data "
                "files) probed in four regimes: data scarcity, class imbalance, label noise and "
                "covariate shift (typos, another language, unseen jailbreak templates). "
                "Baselines on mean-pooled raw activations at the SAE's hook (L2 logistic with C "
                "on validation, PCA + logistic, k-NN, MLP; boosted trees with --methods hgb), "
                "the SAE probe on its "
                "latents, and the quiver that picks per point by validation AUC with and without "
                "it; hyper-parameters on validation folds of the training set only; test AUC "
                "with bootstrap intervals. The model reads each text once; features and "
                "finished task x regime results are cached in --out, so re-running resumes. "
                "Writes probing_study.json (validated against its schema), probing_study.md and "
                "probing_study.html."
            ),
            config=ProbingStudyConfig,
            run=_study_probing,
            positional=("sae_dir",),
        ),
        Command(
            path=("ood", "fit"),
            help="Fit a monitor's ID statistics on an SAE and calibrate its threshold.",
            description=(
                "Fit in-distribution statistics (per-latent firing rates and activation "
                "quantiles, top ID contexts, reconstruction error, pooled-activation covariance) "
                "on the train split of the SAE's corpus, calibrate each score's threshold on the "
                "validation split for --target-fpr, and save the monitor directory (monitor.json, "
                "id_stats.safetensors, a copy of the SAE)."
            ),
            config=OodFitConfig,
            run=_ood_fit,
            positional=("sae_dir",),
        ),
        Command(
            path=("ood", "score"),
            help="Score texts with a monitor; one JSON line per text.",
            description=(
                "Score texts given as arguments, read from --file, or from stdin. Each output line "
                "is a JSON object: every score, the flag (when calibrated) and, for flagged texts, "
                "the top fallacious latents with where they fired and their top in-distribution "
                "contexts. Empty texts get an error field; invalid UTF-8 is replaced and warned "
                "about; texts longer than the context are scored in windows (up to the monitor's "
                "max_windows, then marked truncated). Data-parallel under `torchrun "
                "--nproc-per-node N -m saeguard ood score --monitor-dir M ...` (spell --monitor "
                "as --monitor-dir there: torchrun reads --monitor as its own option): each process "
                "scores every N-th chunk of 64 texts on its device and the first prints every "
                "result in input order: the lines of one process (bit for bit at equal thread "
                "counts; torchrun gives each process one thread unless OMP_NUM_THREADS is set)."
            ),
            config=OodScoreConfig,
            run=_ood_score,
            positional=("texts",),
            # torchrun's own parser takes --monitor for an abbreviation of its --monitor-interval
            aliases={"monitor": ["--monitor-dir"]},
            distributed=True,
        ),
        Command(
            path=("serve",),
            help="Serve a monitor over HTTP: score and explain texts, micro-batched, with metrics.",
            description=(
                "Start a FastAPI service (uvicorn) around a monitor: POST /v1/score and "
                "/v1/explain (JSON batches of texts; the rows `ood score` prints), GET /v1/info, "
                "/healthz, /metrics (Prometheus) and OpenAPI docs at /docs. Concurrent requests "
                "are micro-batched into one forward pass (--max-batch-texts, --max-wait-ms); a "
                "full queue answers 503 with Retry-After; oversize requests 413, malformed ones "
                "422. Listens on 127.0.0.1 by default; any other address needs a bearer token "
                "(--token-file or $SAEGUARD_API_TOKEN). Ctrl-C or SIGTERM lets requests in "
                "flight finish. Clients: `saeguard ood score --url`, curl (docs/serve.md)."
            ),
            config=ServeConfig,
            run=_serve,
        ),
        Command(
            path=("ood", "benchmark"),
            help="AUROC and FPR@95 of every score and baseline on every shift, with an HTML "
            "report.",
            description=(
                "Score in-distribution test texts and each shift (typos at several rates, "
                "jailbreak wrapping, in-the-wild jailbreaks, other languages, another domain, "
                "code) with every SAE score and baseline; write ood_benchmark.json (validated "
                "against its schema), ood_benchmark.md, ood_report.html (ROC curves, histograms) "
                "and examples.html (explained alarms), plus the calibrated threshold's measured "
                "FPR. Scores are saved per set: re-running resumes."
            ),
            config=OodBenchmarkJobConfig,
            run=_ood_benchmark,
        ),
        Command(
            path=("robustify",),
            help="LoRA fine-tuning that keeps SAE latents steady under a shift; before/after "
            "report.",
            description=(
                "Train LoRA adapters (peft) so that on perturbed text (--shift, e.g. typos:0.2) "
                "the frozen SAE's latents at its hook stay close to those of the clean text, plus "
                "the next-token loss on clean ID text to keep capability (SPEC section 6). "
                "Measures the base model and the adapted one on the same held-out texts and "
                "seeds: fallacious count and energy on perturbed text, the OOD AUROC, next-token "
                "loss on perturbed and clean text, topic-probe accuracy on perturbed text (probe "
                "trained on clean base-model activations). Writes OUT/robust/adapter (load it "
                "with --adapter in `ood score`, `ood benchmark` and `eval`), robustify.json "
                "(validated against its schema) and robustify.html. Checkpoints every "
                "--checkpoint-every steps: running the same command again resumes."
            ),
            config=RobustifyConfig,
            run=_robustify,
            exclude=RobustifyConfig.FOLLOWED,
        ),
        Command(
            path=("browse",),
            help="Write a static feature browser for an SAE: every latent's contexts, "
            "histogram, logit effects.",
            description=(
                "One pass over held-out text (the test split of the SAE's corpus, or --corpus) "
                "collects, per latent, its firing rate, activation histogram, top activating "
                "contexts and samples from several activation quantiles; the decoder gives each "
                "latent's logit effects (through the final norm) and nearest latents. Writes a "
                "static site to --out that opens from disk with no server and nothing fetched "
                "from the network: OUT/index.html (all latents, sortable, filterable, "
                "searchable), OUT/latent.html?i=N (one latent), OUT/texts.html (text -> "
                "latents), and OUT/browse.json (docs/browse.md). --monitor adds the monitor's "
                "ID rate and p99.9 per latent."
            ),
            config=BrowseConfig,
            run=_browse,
            positional=("sae_dir",),
        ),
        Command(
            path=("cache",),
            help="Summarise an activation cache and check its shard checksums.",
            description=(
                "Print what an activation cache holds (model, hooks, tokens, exclusions). With "
                "--verify, recompute every shard's SHA-256 and name any corrupt shard."
            ),
            config=CacheInfoConfig,
            run=_cache,
            positional=("directory",),
        ),
        Command(
            path=("hooks",),
            help="List a model's hook points with their shapes.",
            description="List the uniform hook-point names of a model and the shape each produces.",
            config=HooksConfig,
            run=_hooks,
            positional=("model",),
        ),
        Command(
            path=("corpora",),
            help="List the registered corpora with their sizes, labels and licenses.",
            description="List the registered corpora with their sizes, labels, sources and "
            "licenses.",
            config=CorporaConfig,
            run=_corpora,
        ),
    ]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command in :func:`commands`."""
    parser = argparse.ArgumentParser(
        prog="saeguard",
        description="Sparse autoencoders that make language models' failures visible.",
    )
    parser.add_argument("--version", action="version", version=f"saeguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    parser.add_argument("-q", "--quiet", action="store_true", help="Log warnings and errors only.")
    levels: dict[tuple[str, ...], Any] = {
        (): parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    }
    for command in commands():
        *parents, name = command.path
        for depth in range(len(parents)):
            group = tuple(parents[: depth + 1])
            if group not in levels:
                text, description = GROUPS[group]
                sub = levels[group[:-1]].add_parser(group[-1], help=text, description=description)
                levels[group] = sub.add_subparsers(
                    dest="_".join(group) + "_command", metavar="ACTION", required=True
                )
        p = levels[tuple(parents)].add_parser(
            name, help=command.help, description=command.description
        )
        add_config_arguments(
            p,
            command.config,
            aliases=command.aliases,
            positional=command.positional,
            exclude=command.exclude,
        )
        p.set_defaults(func=lambda args, c=command: _run_command(c, args))
    return parser


def _run_command(command: Command, args: argparse.Namespace) -> int:
    if launched_world_size() > 1 and not command.distributed:
        able = ", ".join(" ".join(c.path) for c in commands() if c.distributed)
        raise SaeguardError(
            f"`saeguard {' '.join(command.path)}` runs as one process, not under torchrun "
            f"(data-parallel commands: {able}); start it without torchrun"
        )
    return command.run(config_from_args(command.config, args))


def _rank_tag() -> str:
    """`` (rank N)`` under torchrun, so a user sees which process failed."""
    return f" (rank {os.environ.get('RANK', '0')})" if launched_world_size() > 1 else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    if launched_world_size() > 1 and os.environ.get("RANK", "0") != "0":
        # Under torchrun rank 0 reports; the others log warnings and errors only, without bars.
        level = max(level, logging.WARNING)
        os.environ["TQDM_DISABLE"] = "1"
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    func: Callable[[argparse.Namespace], int] = args.func
    finished = False
    try:
        status = func(args)
        finished = status == 0
        return status
    except SaeguardError as exc:
        print(f"saeguard: error{_rank_tag()}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a permission, ...: one line, unless -v asks for more
        if args.verbose:
            raise
        print(f"saeguard: error{_rank_tag()}: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saeguard: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        release_output_locks()  # in-process callers (tests, notebooks) may run another command
        leave_world(finished)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

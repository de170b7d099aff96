"""`saeguard ood benchmark`: every score x every shift, AUROC and FPR@95%TPR with intervals.

Each shift set is told apart from in-distribution negatives: the ID corpus's ``test`` split
(never used to fit or calibrate the monitor), or the shift's own negatives (plain questions
for jailbreak wrapping). For the table every text is scored on its first context window (its
last for wrapped jailbreaks), so text length does not differ between what is compared. The
calibrated threshold's false-positive rate is measured separately, as deployed (every window),
on those held-out ID texts.

Scores are saved per set as they finish, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from saeguard import __version__
from saeguard.configs import validate_literals
from saeguard.data.shifts import DEFAULT_SHIFTS, ShiftSet, build_shift, id_split_texts
from saeguard.defaults import DEFAULT_CORPUS
from saeguard.devices import check_device_name, describe_device, resolve_device
from saeguard.distributed import join_world
from saeguard.errors import ConfigError
from saeguard.fileio import (
    atomic_write_json,
    atomic_write_text,
    check_output_directory,
    claim_output_directory,
    sha256_file,
    validate_document,
)
from saeguard.ood.config import MonitorConfig
from saeguard.ood.explain import TextScore
from saeguard.ood.metrics import (
    bootstrap_detection,
    detection_summary,
    proportion_ci,
    score_values,
)
from saeguard.ood.monitor import SCORE_CHUNK, Monitor
from saeguard.ood.scores import (
    ALL_SCORES,
    BASELINES,
    FUSED,
    SAE_SCORES,
    SCORE_VERSIONS,
    SINGLE_SCORES,
)
from saeguard.ood.storage import MONITOR_ENTRIES, MONITOR_FILE, fusion_document
from saeguard.steps import Step

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SCHEMA = Path(__file__).with_name("ood_benchmark.schema.json")
RESULT_FILE = "ood_benchmark.json"


@dataclass(kw_only=True)
class OodBenchmarkConfig:
    """What `saeguard ood benchmark` compares and on how much text."""

    shifts: list[str] = field(default_factory=lambda: list(DEFAULT_SHIFTS))
    """Shifts: typos:RATE, jailbreak-wrap, or a corpus (jailbreaks-wild, wiki-es, bbc, ...)."""
    id_texts: int = 400
    """In-distribution negatives (test split of the monitor's corpus)."""
    per_shift: int = 200
    """OOD texts per shift."""
    lm_baselines: bool = True
    """Also score the LM baselines (max-softmax, entropy, perplexity): runs the full model."""
    examples: int = 3
    """Explained examples per shift on the examples page (its highest-scoring flagged texts)."""
    resamples: int = 1000
    """Bootstrap resamples for the intervals."""
    seed: int = 0
    """Seed of text samples, typos and the bootstrap."""
    adapter: str = ""
    """LoRA adapter directory (from `saeguard robustify`) merged into the model before scoring."""

    def __post_init__(self) -> None:
        validate_literals(self)
        if not self.shifts:
            raise ConfigError("--shifts is empty; name at least one shift (e.g. typos:0.2)")
        if self.id_texts < 10 or self.per_shift < 10:
            raise ConfigError("--id-texts and --per-shift must be at least 10 for an AUROC")
        if self.resamples < 100:
            raise ConfigError("--resamples must be at least 100")


def _signature(monitor_dir: Path, cfg: OodBenchmarkConfig, name: str, texts: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(sha256_file(monitor_dir / MONITOR_FILE).encode())
    digest.update(f"{name}|{cfg.lm_baselines}|{cfg.seed}|{__version__}".encode())
    if cfg.adapter:  # scores of an adapted model are never mistaken for the base model's
        digest.update(sha256_file(Path(cfg.adapter) / "adapter_model.safetensors").encode())
    for text in texts:
        digest.update(text.encode("utf-8", errors="surrogatepass") + b"\x00")
    return digest.hexdigest()


def score_set_path(out: Path, name: str) -> Path:
    """Where a benchmark keeps the per-text scores of one text set (``OUT/scores/NAME.json``)."""
    return out / "scores" / f"{name.replace(':', '_').replace('/', '_')}.json"


def _score_set(
    monitor: Monitor,
    monitor_dir: Path,
    out: Path,
    cfg: OodBenchmarkConfig,
    name: str,
    texts: list[str],
    keep: str = "head",
    max_windows: int | None = 1,
    with_lm: bool | None = None,
) -> list[dict[str, Any]]:
    """Scores of one text set, from ``scores/NAME.json`` when an earlier run finished it."""
    path = score_set_path(out, name)
    signature = _signature(monitor_dir, cfg, f"{name}|{keep}|{max_windows}", texts)
    step = Step(path, signature)
    results = (step.saved() or {}).get("results")
    if isinstance(results, list) and all(isinstance(r, dict) for r in results):
        return results
    lm = cfg.lm_baselines if with_lm is None else with_lm
    results = monitor.score(
        texts,
        with_lm=lm,
        explain=False,
        keep="tail" if keep == "tail" else "head",
        max_windows=max_windows,
        progress=f"score {name}",
    )
    rows = [r.to_json() for r in results]
    step.record(name=name, results=rows)
    return rows


def run_benchmark(
    monitor_dir: str | Path,
    out: str | Path,
    cfg: OodBenchmarkConfig,
    device: str | torch.device = "cpu",
    site: str = "",
) -> dict[str, Any]:
    """Score every shift and the ID negatives on ``device`` (a ``--device`` word or a resolved
    device); write the JSON, markdown table and HTML report (with ``site``, a `saeguard browse`
    site, each explained latent links to its page)."""
    device = resolve_device(device) if isinstance(device, str) else device
    from saeguard.report.ood_report import markdown_tables, write_ood_report
    from saeguard.report.site_links import add_latent_pages

    monitor_dir, out = Path(monitor_dir), Path(out)
    pages = site_prefix(site, relative_to=out) if site else ""  # a bad site fails first
    monitor = Monitor.load(monitor_dir, adapter=cfg.adapter, device=device)  # a bad monitor
    # creates no --out
    claim_output_directory(out, "ood benchmark", index=(RESULT_FILE, "scores"))
    if monitor.needs_lm and not cfg.lm_baselines:
        raise ConfigError(
            f"the monitor's flag score {monitor.cfg.flag_score} needs the LM baselines, which "
            "--no-lm-baselines turns off; drop --no-lm-baselines, or fit the monitor with "
            "--no-fused-with-lm (or another --flag-score)"
        )
    if not monitor.thresholds:
        raise ConfigError(
            f"the monitor in {monitor_dir} is not calibrated; run `saeguard ood fit` (it "
            "calibrates) or Monitor.calibrate() first"
        )
    corpus = str(monitor.sae_metadata.get("corpus") or DEFAULT_CORPUS)
    id_texts = id_split_texts(corpus, "test", cfg.id_texts, cfg.seed)
    shift_sets = [build_shift(name, id_texts, cfg.per_shift, cfg.seed) for name in cfg.shifts]
    id_rows = _score_set(monitor, monitor_dir, out, cfg, "id", id_texts)
    scored: dict[str, tuple[ShiftSet, list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for shift in shift_sets:
        rows = _score_set(
            monitor, monitor_dir, out, cfg, shift.name, shift.ood_texts, shift.truncate
        )
        negatives = id_rows
        if shift.id_texts is not None:
            negatives = _score_set(
                monitor,
                monitor_dir,
                out,
                cfg,
                f"{shift.name}-negatives",
                shift.id_texts,
                shift.truncate,
            )
        scored[shift.name] = (shift, rows, negatives)
    deployed = _score_set(
        monitor, monitor_dir, out, cfg, "id-deployed", id_texts, max_windows=None,
        with_lm=monitor.needs_lm,
    )  # fmt: skip
    flag_score = monitor.cfg.flag_score
    threshold = monitor.thresholds[flag_score]
    flags = score_values(deployed, flag_score) > threshold
    names = [s for s in ALL_SCORES if len(score_values(id_rows, s))]
    table: dict[str, dict[str, Any]] = {}
    for shift_name, (shift, rows, negatives) in scored.items():
        cells: dict[str, Any] = {}
        for score in names:
            cells[score] = bootstrap_detection(
                score_values(negatives, score), score_values(rows, score), cfg.resamples, cfg.seed
            )
        flagged = score_values(rows, flag_score) > threshold
        table[shift_name] = {
            "kind": shift.kind,
            "negatives": "own" if shift.id_texts is not None else "id",
            "scores": cells,
            "flag_rate": float(flagged.mean()),
            "flag_rate_ci95": proportion_ci(flagged, cfg.resamples, cfg.seed),
        }
    document = {
        "saeguard_version": __version__,
        "monitor": str(monitor_dir),
        "model": monitor.model_info["name"],
        "adapter": monitor.loaded.adapter,
        "hook": monitor.hook,
        "sae": _sae_summary(monitor),
        "config": asdict(cfg),
        "id_corpus": corpus,
        "scores": names,
        "sae_scores": [s for s in names if s in SAE_SCORES],
        "baselines": [s for s in names if s in BASELINES],
        "calibration": {
            **monitor.calibration,
            "flag_score": flag_score,
            "threshold": threshold,
            "measured_fpr": float(flags.mean()),
            "measured_fpr_ci95": proportion_ci(flags, cfg.resamples, cfg.seed),
            "measured_on": f"{corpus} test split, {len(flags)} texts, every window",
        },
        "shifts": table,
        "score_versions": {name: SCORE_VERSIONS[name] for name in names},
        "device": describe_device(monitor.device),  # of this run; no score set's signature
    }
    if FUSED in names:
        document["fusion"] = fusion_document(monitor)
        document["summary"] = detection_summary(
            table,
            FUSED,
            [s for s in names if s in SINGLE_SCORES],
            [s for s in names if s in BASELINES],
        )
    validate_document(document, SCHEMA)
    atomic_write_json(out / RESULT_FILE, document)
    atomic_write_text(out / "ood_benchmark.md", markdown_tables(document))
    examples = _explained_examples(monitor, cfg, scored, id_texts, id_rows, deployed)
    if pages:
        add_latent_pages(examples, pages)
    atomic_write_json(out / "examples.json", examples)
    raw = {name: (rows, negs) for name, (_, rows, negs) in scored.items()}
    write_ood_report(out, document, raw, examples, n_id_tokens=monitor.stats.n_tokens)
    return document


def site_prefix(site: str, relative_to: Path | None = None) -> str:
    """The address (ending in /) of a `saeguard browse` site's folder: a URL as given; a local
    folder, checked to be such a site, relative to ``relative_to`` (the folder of the page that
    links to it) or else as a file:// URL."""
    if site.startswith(("http://", "https://")):
        return site.rstrip("/") + "/"
    path = Path(site)
    if not (path / "index.html").is_file() or not (path / "latent.html").is_file():
        raise ConfigError(
            f"--site {site} is not a site written by `saeguard browse` (no index.html and "
            "latent.html there); build one with `saeguard browse SAE_DIR --out SITE`"
        )
    if relative_to is None:
        return path.resolve().as_uri() + "/"
    return Path(os.path.relpath(path.resolve(), relative_to.resolve())).as_posix() + "/"


def _sae_summary(monitor: Monitor) -> dict[str, Any]:
    cfg = monitor.sae.cfg
    masking = monitor.sae_metadata.get("masking") or {}
    return {
        "architecture": cfg.architecture,
        "k": cfg.k,
        "d_sae": cfg.d_sae,
        "mask_prob": float(masking.get("mask_prob", 0.0)),
    }


def _explained_examples(
    monitor: Monitor,
    cfg: OodBenchmarkConfig,
    scored: dict[str, tuple[ShiftSet, list[dict[str, Any]], list[dict[str, Any]]]],
    id_texts: list[str],
    id_rows: list[dict[str, Any]],
    deployed: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The highest-scoring flagged texts of each shift, re-scored with their explanations, and
    the ID texts the monitor flags (false positives), so a person can judge both."""
    name = monitor.cfg.flag_score
    out: list[dict[str, Any]] = []

    def top(rows: list[dict[str, Any]], n: int) -> list[int]:
        ok = [r for r in rows if r["error"] is None and r.get("flagged")]
        ok.sort(key=lambda r: r["scores"][name], reverse=True)
        return [int(r["index"]) for r in ok[:n]]

    for shift_name, (shift, rows, _) in scored.items():
        picked = top(rows, cfg.examples)
        results = monitor.score(
            [shift.ood_texts[i] for i in picked], explain=True, explain_all=True,
            keep="tail" if shift.truncate == "tail" else "head", max_windows=1, tokens=True,
        )  # fmt: skip
        out += [
            _example(shift_name, shift.ood_texts[i], r)
            for i, r in zip(picked, results, strict=True)
        ]
    false_pos = top(deployed, cfg.examples)
    results = monitor.score(
        [id_texts[i] for i in false_pos], explain=True, explain_all=True, tokens=True
    )
    out += [
        _example("id (false positive)", id_texts[i], r)
        for i, r in zip(false_pos, results, strict=True)
    ]
    return out


def _example(shift: str, text: str, result: TextScore) -> dict[str, Any]:
    return {"shift": shift, "text": text, **result.to_json()}


@dataclass(kw_only=True)
class OodFitConfig:
    """`saeguard ood fit`: which SAE, where the monitor goes, and how it is fitted."""

    sae_dir: str
    """SAE directory (cfg.json + sae_weights.safetensors)."""
    out: str
    """Monitor directory to write."""
    model: str = ""
    """Model (empty: the one in the SAE's cfg.json)."""
    corpus: str = ""
    """ID corpus (empty: the SAE's training corpus)."""
    calibrate: bool = True
    """Calibrate thresholds on the corpus's validation split."""
    device: str = "auto"
    """Torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under
    torchrun each process takes the GPU of its local rank."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """How the monitor is fitted and calibrated."""

    def __post_init__(self) -> None:
        check_device_name(self.device)


def fit_monitor(cfg: OodFitConfig) -> Monitor:
    """Fit (and calibrate) a monitor on ``cfg.device`` and save it to ``cfg.out``; a missing
    device or a foreign --out is refused before the work, not after."""
    device = resolve_device(cfg.device)
    check_output_directory(Path(cfg.out), MONITOR_ENTRIES)
    monitor = Monitor.fit(
        cfg.sae_dir, cfg.monitor, model=cfg.model, corpus=cfg.corpus, device=device
    )
    if cfg.calibrate:
        monitor.calibrate(corpus=cfg.corpus)
    monitor.save(cfg.out)
    return monitor


@dataclass(kw_only=True)
class OodScoreConfig:
    """`saeguard ood score`: the texts and the monitor that scores them."""

    texts: list[str] = field(default_factory=list)
    """Texts to score (default: read --file or stdin)."""
    monitor: str = ""
    """Monitor directory from `saeguard ood fit` (or --url)."""
    url: str = ""
    """Score with a running `saeguard serve` at this URL (http://HOST:PORT) instead of loading
    a monitor; the output lines are the same."""
    token_file: str = ""
    """With --url: file holding the service's bearer token (else $SAEGUARD_API_TOKEN)."""
    site: str = ""
    """A feature-browser site from `saeguard browse` (its folder or URL): each explained latent
    gets a 'page' field, the address of its page there."""
    file: str = ""
    """Read texts from this file ('-' or empty: stdin)."""
    input_format: Literal["lines", "jsonl", "whole"] = "lines"
    """lines: one text per line; jsonl: objects with a 'text' field; whole: one text."""
    model: str = ""
    """Model (empty: the one the monitor was fitted on)."""
    adapter: str = ""
    """LoRA adapter directory from `saeguard robustify`, merged into the model first."""
    with_lm: bool = False
    """Also compute the LM baselines (full forward); they are computed anyway when the
    monitor's flag score needs them (the default fused score does)."""
    explain: bool = True
    """Explain flagged texts."""
    explain_all: bool = False
    """Explain every text, flagged or not."""
    tokens: bool = False
    """Add every token's own scores (reconstruction error, fallacious surprisal, LM surprisal)
    and the fallacious latents that fired on it, to locate where a text leaves the
    distribution."""
    device: str = "auto"
    """Torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under
    torchrun each process takes the GPU of its local rank."""

    def __post_init__(self) -> None:
        validate_literals(self)
        check_device_name(self.device)
        if bool(self.monitor) == bool(self.url):
            raise ConfigError(
                "give the monitor directory (--monitor DIR) or a running service (--url URL), "
                "one of the two"
            )
        if self.url and (self.model or self.adapter):
            raise ConfigError(
                "--model and --adapter choose what a local monitor loads; a service (--url) "
                "scores with the model it was started with"
            )


def score_texts(cfg: OodScoreConfig, texts: list[str | bytes]) -> list[dict[str, Any]]:
    """`saeguard ood score`: every text's result (``TextScore.to_json()``), in input order.

    Data-parallel under torchrun: each rank loads the monitor on its own device and scores
    the chunks of :data:`~saeguard.ood.monitor.SCORE_CHUNK` consecutive texts it owns (chunk
    ``c`` belongs to rank ``c % world size``), and rank 0 gathers every rank's results; the
    other ranks return an empty list, so only rank 0 prints. Whole chunks keep every batch
    what it is in one process, so the numbers are those of one process, bit for bit when the
    processes have as many threads (torchrun gives each one thread unless OMP_NUM_THREADS says
    otherwise; other thread counts or other company change a text's numbers by float rounding).
    """
    if not texts:
        raise ConfigError("no text to score: pass texts as arguments, --file PATH, or stdin")
    pages = site_prefix(cfg.site) if cfg.site else ""  # a bad site fails before any work
    rows = _score_remotely(cfg, texts) if cfg.url else _score_locally(cfg, texts)
    if pages:
        from saeguard.report.site_links import add_latent_pages

        add_latent_pages(rows, pages)
    return rows


def _score_locally(cfg: OodScoreConfig, texts: list[str | bytes]) -> list[dict[str, Any]]:
    """`ood score --monitor`: load the monitor here (on every rank under torchrun)."""
    device = resolve_device(cfg.device)  # a missing GPU fails before anything is loaded
    world = join_world(device)
    monitor = Monitor.load(cfg.monitor, model=cfg.model, adapter=cfg.adapter, device=device)
    mine = [i for i in range(len(texts)) if world.owns(i // SCORE_CHUNK)]
    results = monitor.score(
        [texts[i] for i in mine],
        with_lm=True if cfg.with_lm else None,
        explain=cfg.explain,
        explain_all=cfg.explain_all,
        progress="score" if len(mine) > 16 else None,
        tokens=cfg.tokens,
    )
    rows = [{**result.to_json(), "index": i} for i, result in zip(mine, results, strict=True)]
    gathered = world.gather_json(rows)
    if not world.is_main:
        return []
    return sorted((row for part in gathered for row in part), key=lambda row: row["index"])


def _score_remotely(cfg: OodScoreConfig, texts: list[str | bytes]) -> list[dict[str, Any]]:
    """`ood score --url`: the same rows, from a running `saeguard serve`."""
    from saeguard.distributed import launched_world_size
    from saeguard.serve.client import ServiceClient
    from saeguard.serve.settings import read_token

    if launched_world_size() > 1:
        raise ConfigError("`ood score --url` sends texts to a service: start it without torchrun")
    client = ServiceClient(cfg.url, read_token(cfg.token_file))
    return client.score(
        texts,
        explain=cfg.explain,
        explain_all=cfg.explain_all,
        tokens=cfg.tokens,
        with_lm=True if cfg.with_lm else None,
    )


@dataclass(kw_only=True)
class OodBenchmarkJobConfig:
    """`saeguard ood benchmark`: which monitor, where the results go, and what is scored."""

    monitor: str
    """Monitor directory from `saeguard ood fit`."""
    out: str
    """Directory for the results and reports."""
    device: str = "auto"
    """Torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under
    torchrun each process takes the GPU of its local rank."""
    benchmark: OodBenchmarkConfig = field(default_factory=OodBenchmarkConfig)
    """What is scored, on how much text."""
    site: str = ""
    """A feature-browser site from `saeguard browse` (its folder, or its URL when served):
    each explained latent in examples.html links to its page there."""

    def __post_init__(self) -> None:
        check_device_name(self.device)

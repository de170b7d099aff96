"""The OOD monitor: fit on ID text, calibrate a threshold, score texts and explain each alarm.

A monitor is a directory: ``monitor.json`` (settings, model identity, thresholds, reference
score statistics), ``id_stats.safetensors`` (the :class:`~saeguard.ood.stats.IDStats` tensors),
``calibration_scores.json`` and ``sae/`` (a copy of the SAE, so the monitor is self-contained).
It is written to a temporary directory first and moved into place, so an interrupted save never
leaves a half-written monitor and never destroys the previous one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saeguard import __version__
from saeguard.activations.exclusion import ExclusionRules
from saeguard.configs import validate_literals
from saeguard.data.shifts import id_split_texts
from saeguard.errors import ConfigError, CorruptFileError, SaeguardError
from saeguard.fileio import atomic_directory, atomic_write_json, check_schema, read_json
from saeguard.models.loading import LoadedModel, load_model
from saeguard.ood.analysis import TextAnalysis, analyse
from saeguard.ood.reader import ActivationReader, Keep, ReadFailure, TextActivations
from saeguard.ood.scores import (
    ALL_SCORES,
    ENERGY_COMPONENTS,
    LM_BASELINES,
    reconstruct,
    relative_error,
    sparse_codes,
)
from saeguard.ood.stats import IDStats, StatsAccumulator
from saeguard.sae.base import SparseAutoencoder
from saeguard.sae.io import load_sae, save_sae

log = logging.getLogger(__name__)

FORMAT = "saeguard-monitor"
FORMAT_VERSION = 1
MONITOR_FILE = "monitor.json"
STATS_FILE = "id_stats.safetensors"
CALIBRATION_FILE = "calibration_scores.json"
SAE_SUBDIR = "sae"
SCHEMA = Path(__file__).with_name("monitor.schema.json")
"""JSON schema of ``monitor.json``, checked on every load."""
MONITOR_ENTRIES = (SAE_SUBDIR, STATS_FILE, CALIBRATION_FILE, MONITOR_FILE)
"""Everything a monitor directory holds: ``ood fit`` refuses a directory with anything else."""


@dataclass
class MonitorConfig:
    """How a monitor is fitted and calibrated (`saeguard ood fit`)."""

    fit_texts: int = 1500
    """ID texts (train split of the corpus) the statistics are fitted on."""
    calibration_texts: int = 500
    """Held-out ID texts (validation split) the threshold is calibrated on."""
    target_fpr: float = 0.05
    """False-positive rate the threshold is set for on held-out ID text."""
    flag_score: str = "energy"
    """Score that raises the flag (any SAE score or baseline; LM baselines need the full model)."""
    tau_rate: float = 1e-4
    """A latent firing on fewer than this fraction of ID tokens is rare (fallacious when active)."""
    range_margin: float = 0.1
    """A latent above its ID p99.9 x (1 + this) is out of range (fallacious)."""
    reference_fraction: float = 0.2
    """Share of the fit texts held back from the statistics to z-score the energy components."""
    knn_k: int = 10
    """Neighbour rank for the k-NN distance baseline."""
    id_contexts: int = 5
    """Top-activating ID contexts kept per latent for explanations."""
    explain_latents: int = 3
    """Fallacious latents listed in each flagged text's explanation."""
    max_windows: int = 64
    """Windows of ctx_len tokens scored per text; a longer text is cut and marked truncated."""
    batch_size: int = 16
    """Windows per forward pass."""
    seed: int = 0
    """Seed of the text samples and the reference split."""

    def __post_init__(self) -> None:
        validate_literals(self)
        if self.flag_score not in ALL_SCORES:
            raise ConfigError(
                f"unknown --flag-score {self.flag_score!r}; choose from {', '.join(ALL_SCORES)}"
            )
        if not 0 < self.target_fpr < 0.5:
            raise ConfigError(f"--target-fpr must lie in (0, 0.5), got {self.target_fpr}")
        if not 0 < self.tau_rate < 1:
            raise ConfigError(f"--tau-rate must lie in (0, 1), got {self.tau_rate}")
        if self.range_margin < 0:
            raise ConfigError(f"--range-margin must be >= 0, got {self.range_margin}")
        if not 0 < self.reference_fraction < 0.9:
            raise ConfigError("--reference-fraction must lie in (0, 0.9)")
        if self.fit_texts < 20:
            raise ConfigError(f"--fit-texts must be at least 20, got {self.fit_texts}")
        if self.calibration_texts < 20:
            raise ConfigError(
                f"--calibration-texts must be at least 20 (got {self.calibration_texts}): "
                "a threshold for a 5% FPR needs enough held-out texts to place it"
            )
        for name in ("knn_k", "id_contexts", "explain_latents", "max_windows", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")


@dataclass
class LatentExplanation:
    """Why one latent made a text look out-of-distribution."""

    latent: int
    reason: str
    """"rare" (almost never active on ID text), "out of range" (far above its ID p99.9) or both."""
    id_rate: float
    id_firings: int
    id_p999: float
    max_activation: float
    total_activation: float
    tokens_fired: int
    input_contexts: list[dict[str, Any]]
    """Where it fired in the input: {left, token, right, value}."""
    id_contexts: list[dict[str, Any]]
    """Its top-activating in-distribution contexts: {left, token, right, value}."""


@dataclass
class TextScore:
    """The monitor's verdict on one text."""

    index: int
    scores: dict[str, float] = field(default_factory=dict)
    flagged: bool | None = None
    """None when the monitor is uncalibrated or the text could not be scored."""
    n_tokens: int = 0
    n_windows: int = 0
    truncated: bool = False
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    explanation: list[LatentExplanation] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.explanation:
            out.pop("explanation")
        return out


class Monitor:
    """SAE-based OOD detector with baselines, a calibrated flag and explanations."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        sae_metadata: dict[str, Any],
        loaded: LoadedModel,
        cfg: MonitorConfig,
        stats: IDStats,
        rules: ExclusionRules,
        ctx_len: int,
        prepend_bos: bool = True,
        reference: dict[str, tuple[float, float]] | None = None,
        model_info: dict[str, Any] | None = None,
    ) -> None:
        self.sae = sae.eval()
        self.sae_metadata = sae_metadata
        self.loaded = loaded
        self.cfg = cfg
        self.stats = stats
        self.rules = rules
        self.hook = str(sae_metadata["hook"])
        self.ctx_len = ctx_len
        self.prepend_bos = prepend_bos
        self.reference = reference or {}
        self.thresholds: dict[str, float] = {}
        self.calibration: dict[str, Any] = {}
        self.calibration_scores: dict[str, list[float]] = {}
        self.model_info = model_info or _model_info(loaded)
        self.reader = ActivationReader(
            loaded, self.hook, rules, ctx_len, prepend_bos, cfg.batch_size
        )

    # --- fitting -----------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        sae_dir: str | Path,
        cfg: MonitorConfig | None = None,
        texts: Sequence[str] | None = None,
        loaded: LoadedModel | None = None,
        model: str = "",
        corpus: str = "",
        progress: bool = True,
    ) -> Monitor:
        """Fit ID statistics on ``texts`` (default: the train split of the SAE's corpus)."""
        from saeguard.activations.subject import load_subject

        cfg = cfg or MonitorConfig()
        subject = load_subject(sae_dir, model=model, corpus=corpus, split="train", loaded=loaded)
        meta = subject.metadata
        corpus_name = corpus or str(meta.get("corpus") or "wiki-en")
        if texts is None:
            texts = id_split_texts(corpus_name, "train", cfg.fit_texts, cfg.seed)
        texts = [t for t in texts if t.strip()]
        if len(texts) < 10:
            raise ConfigError(
                f"only {len(texts)} non-empty ID text(s) to fit the monitor on; give at least 10 "
                "(200 or more for usable statistics)"
            )
        prepend_bos = bool(meta.get("prepend_bos", True))
        reader = ActivationReader(
            subject.loaded, subject.hook, subject.source.rules, subject.ctx_len, prepend_bos,
            cfg.batch_size,
        )  # fmt: skip
        stats, reference_items = _fit_stats(reader, subject.sae, cfg, texts, progress)
        monitor = cls(
            subject.sae,
            meta,
            subject.loaded,
            cfg,
            stats,
            subject.source.rules,
            subject.ctx_len,
            prepend_bos,
        )
        analyses = monitor.analyse(reference_items, with_lm=False)
        monitor.reference = {
            name: (
                float(np.mean([a.scores[name] for a in analyses])),
                float(np.std([a.scores[name] for a in analyses])),
            )
            for name in ENERGY_COMPONENTS
        }
        log.info(
            "monitor fitted on %d ID tokens (%d texts); energy reference %s",
            monitor.stats.n_tokens,
            monitor.stats.n_texts,
            {k: tuple(round(x, 4) for x in v) for k, v in monitor.reference.items()},
        )
        return monitor

    # --- scoring ------------------------------------------------------------------------------
    def analyse_acts(self, acts: Sequence[torch.Tensor]) -> list[TextAnalysis]:
        """Every SAE score and activation baseline of texts given by their kept activations."""
        return analyse(
            self.sae,
            acts,
            self.stats,
            self.cfg.tau_rate,
            self.cfg.range_margin,
            self.cfg.knn_k,
            self.reference,
        )

    def analyse(self, items: Sequence[TextActivations], with_lm: bool) -> list[TextAnalysis]:
        """Every score of a batch of texts (one SAE pass over all their tokens)."""
        analyses = self.analyse_acts([it.acts for it in items])
        if with_lm:
            for item, analysis in zip(items, analyses, strict=True):
                analysis.scores.update(item.lm)
        return analyses

    def score(
        self,
        texts: Sequence[str | bytes],
        with_lm: bool | None = None,
        explain: bool = True,
        explain_all: bool = False,
        keep: Keep = "head",
        max_windows: int | None = None,
        progress: str | None = None,
    ) -> list[TextScore]:
        """Score texts: every SAE score and activation baseline (LM baselines with ``with_lm``),
        the flag when calibrated, and for flagged texts the latents that raised it.

        Bytes are decoded as UTF-8 with invalid sequences replaced (the result warns). Empty
        texts get an ``error`` instead of scores; the rest of the batch is scored normally.
        """
        with_lm = self.cfg.flag_score in LM_BASELINES if with_lm is None else with_lm
        results = [TextScore(index=i) for i in range(len(texts))]
        decoded: list[str] = []
        for i, text in enumerate(texts):
            if isinstance(text, bytes):
                try:
                    decoded.append(text.decode("utf-8"))
                except UnicodeDecodeError:
                    decoded.append(text.decode("utf-8", errors="replace"))
                    results[i].warnings.append("input was not valid UTF-8: bad bytes became U+FFFD")
            else:
                decoded.append(str(text))
        limit = max_windows or self.cfg.max_windows
        batch: list[tuple[int, TextActivations]] = []

        def flush() -> None:
            analyses = self.analyse([it for _, it in batch], with_lm)
            for (i, item), analysis in zip(batch, analyses, strict=True):
                self._fill(results[i], item, analysis, explain, explain_all)
            batch.clear()

        for i, item in self.reader.read(decoded, with_lm, keep, limit, progress):
            if isinstance(item, ReadFailure):
                results[i].error = item.message
                continue
            batch.append((i, item))
            if len(batch) >= 64:
                flush()
        if batch:
            flush()
        return results

    def _fill(
        self,
        result: TextScore,
        item: TextActivations,
        analysis: TextAnalysis,
        explain: bool,
        explain_all: bool,
    ) -> None:
        result.scores = analysis.scores
        result.n_tokens = len(item.acts)
        result.n_windows = len(item.windows)
        result.truncated = item.truncated
        if item.truncated:
            result.warnings.append(
                f"text longer than {self.cfg.max_windows} windows of {self.ctx_len} tokens: "
                "only the first windows were scored"
            )
        name = self.cfg.flag_score
        if name in self.thresholds and name in analysis.scores:
            result.flagged = analysis.scores[name] > self.thresholds[name]
        if explain and (result.flagged or explain_all):
            result.explanation = self.explain(item, analysis)

    # --- explanations ------------------------------------------------------------------------
    def explain(self, item: TextActivations, analysis: TextAnalysis) -> list[LatentExplanation]:
        """The text's top fallacious latents (by total activation) with ID and input contexts."""
        rows, cols = analysis.fallacious.nonzero(as_tuple=True)
        if len(rows) == 0:
            return []
        latents = analysis.codes.indices[rows, cols]
        mags = analysis.codes.values[rows, cols].abs().float()
        totals = torch.zeros(self.sae.cfg.d_sae).index_add_(0, latents, mags)
        top = totals.topk(min(self.cfg.explain_latents, int((totals > 0).sum()))).indices
        out = []
        for latent in top.tolist():
            hit = latents == latent
            hit_rows, hit_cols = rows[hit], cols[hit]
            values = mags[hit]
            reasons = []
            if bool(analysis.rare[hit_rows, hit_cols].any()):
                reasons.append("rare")
            if bool(analysis.out_of_range[hit_rows, hit_cols].any()):
                reasons.append("out of range")
            order = values.argsort(descending=True)[:3]
            input_contexts = [
                self._snippet(
                    item.windows[int(item.window[hit_rows[j]])],
                    int(item.position[hit_rows[j]]),
                    float(values[j]),
                )
                for j in order.tolist()
            ]
            out.append(
                LatentExplanation(
                    latent=latent,
                    reason=" and ".join(reasons),
                    id_rate=float(self.stats.rate[latent]),
                    id_firings=int(self.stats.firing_count[latent]),
                    id_p999=float(self.stats.p999[latent]),
                    max_activation=float(values.max()),
                    total_activation=float(values.sum()),
                    tokens_fired=len(values),
                    input_contexts=input_contexts,
                    id_contexts=self.id_contexts(latent),
                )
            )
        return out

    def id_contexts(self, latent: int) -> list[dict[str, Any]]:
        """Top-activating in-distribution contexts of a latent (empty if it never fired)."""
        out = []
        for rank in range(self.stats.top_values.shape[0]):
            value = float(self.stats.top_values[rank, latent])
            if value <= 0:
                break
            row = self.stats.context_tokens[int(self.stats.top_window[rank, latent])]
            window = [int(t) for t in row if t >= 0]
            out.append(self._snippet(window, int(self.stats.top_position[rank, latent]), value))
        return out

    def _snippet(self, window: list[int], position: int, value: float) -> dict[str, Any]:
        decode = self.loaded.tokenizer.decode
        start = 1 if self.reader.spec.start_id is not None else 0
        return {
            "left": decode(window[max(start, position - 12) : position]),
            "token": decode(window[position : position + 1]),
            "right": decode(window[position + 1 : position + 5]),
            "value": round(value, 4),
        }

    # --- calibration --------------------------------------------------------------------------
    def calibrate(
        self,
        texts: Sequence[str] | None = None,
        target_fpr: float | None = None,
        corpus: str = "",
        with_lm: bool | None = None,
    ) -> dict[str, float]:
        """Set each score's threshold at the (1 - target_fpr) quantile of held-out ID text
        (default: the validation split of the SAE's corpus). Returns the thresholds."""
        fpr = self.cfg.target_fpr if target_fpr is None else target_fpr
        if not 0 < fpr < 0.5:
            raise ConfigError(f"target FPR must lie in (0, 0.5), got {fpr}")
        corpus_name = corpus or str(self.sae_metadata.get("corpus") or "wiki-en")
        source = "given texts"
        if texts is None:
            texts = id_split_texts(
                corpus_name, "validation", self.cfg.calibration_texts, self.cfg.seed
            )
            source = f"{corpus_name} validation split"
        results = self.score(
            texts,
            with_lm=with_lm,
            explain=False,
            progress="calibrate",
        )
        scored = [r for r in results if r.error is None]
        if len(scored) < 20:
            raise ConfigError(f"only {len(scored)} scorable calibration texts; give at least 20")
        names = list(scored[0].scores)
        self.calibration_scores = {n: [r.scores[n] for r in scored] for n in names}
        self.thresholds = {
            n: float(np.quantile(self.calibration_scores[n], 1 - fpr, method="higher"))
            for n in names
        }
        self.calibration = {
            "target_fpr": fpr,
            "n_texts": len(scored),
            "source": source,
            "flag_score": self.cfg.flag_score,
        }
        self.cfg.target_fpr = fpr
        return dict(self.thresholds)

    # --- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the monitor directory: built in a staging folder inside it, then moved into place
        with ``monitor.json`` last; a directory holding files of anything else is refused."""
        directory = Path(directory)
        with atomic_directory(directory, MONITOR_ENTRIES, index=MONITOR_FILE) as tmp:
            save_sae(self.sae, tmp / SAE_SUBDIR, self.sae_metadata)
            save_file(
                {k: v.contiguous() for k, v in self.stats.tensors().items()},
                str(tmp / STATS_FILE),
            )
            atomic_write_json(tmp / CALIBRATION_FILE, self.calibration_scores)
            atomic_write_json(tmp / MONITOR_FILE, self.document())
        return directory

    def document(self) -> dict[str, Any]:
        """The contents of ``monitor.json``."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "saeguard_version": __version__,
            "config": asdict(self.cfg),
            "model": self.model_info,
            "hook": self.hook,
            "ctx_len": self.ctx_len,
            "prepend_bos": self.prepend_bos,
            "exclusions": self.rules.to_dict(),
            "stats": self.stats.scalars(),
            "reference": {k: list(v) for k, v in self.reference.items()},
            "thresholds": self.thresholds,
            "calibration": self.calibration,
        }

    @classmethod
    def load(
        cls,
        directory: str | Path,
        loaded: LoadedModel | None = None,
        model: str = "",
        adapter: str = "",
    ) -> Monitor:
        """Load a monitor; a model other than the one it was fitted for is refused. With
        ``adapter`` (a `saeguard robustify` adapter directory) the model scored is the base model
        with that adapter merged in, judged against the base model's statistics."""
        directory = Path(directory)
        path = directory / MONITOR_FILE
        doc = read_monitor_document(directory)
        try:
            tensors = load_file(str(directory / STATS_FILE))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CorruptFileError(
                f"{directory / STATS_FILE} is missing or corrupt ({exc}); re-run `saeguard ood fit`"
            ) from exc
        sae, meta = load_sae(directory / SAE_SUBDIR)
        info = doc["model"]
        if loaded is None:
            loaded = load_model(model or info["name"], adapter=adapter)
        elif adapter:
            from saeguard.models.adapters import merge_adapter

            loaded = merge_adapter(loaded, adapter)
        _check_model(loaded, info, doc["hook"], directory)
        known = {f for f in MonitorConfig.__dataclass_fields__}
        try:
            cfg = MonitorConfig(**{k: v for k, v in doc["config"].items() if k in known})
        except ConfigError as exc:
            raise CorruptFileError(f"{path}: its config cannot work ({exc})") from exc
        stats = IDStats.from_parts(doc["stats"], tensors)
        if stats.firing_count.shape[0] != sae.cfg.d_sae:
            raise CorruptFileError(
                f"{directory}: the statistics cover {stats.firing_count.shape[0]} latents but the "
                f"SAE has {sae.cfg.d_sae}; the files come from different monitors"
            )
        rules = ExclusionRules(**doc["exclusions"])
        monitor = cls(
            sae,
            meta,
            loaded,
            cfg,
            stats,
            rules,
            int(doc["ctx_len"]),
            bool(doc["prepend_bos"]),
            {k: (float(v[0]), float(v[1])) for k, v in doc["reference"].items()},
            info,
        )
        monitor.thresholds = {k: float(v) for k, v in doc["thresholds"].items()}
        monitor.calibration = dict(doc.get("calibration") or {})
        calib = directory / CALIBRATION_FILE
        if calib.is_file():
            monitor.calibration_scores = _read_calibration_scores(calib)
        return monitor


def read_monitor_document(directory: Path) -> dict[str, Any]:
    """``monitor.json`` of a monitor directory, checked against its schema (one clear line for a
    missing, torn or edited file)."""
    path = directory / MONITOR_FILE
    if not path.is_file():
        raise SaeguardError(
            f"{directory} holds no {MONITOR_FILE}: not a monitor directory (create one with "
            "`saeguard ood fit`)"
        )
    doc = read_json(path, "Re-run `saeguard ood fit`.")
    if (
        not isinstance(doc, dict)
        or doc.get("format") != FORMAT
        or doc.get("format_version") != FORMAT_VERSION
    ):
        raise CorruptFileError(
            f"{path} is not a saeguard monitor of format version {FORMAT_VERSION}"
        )
    check_schema(doc, SCHEMA, path, "Re-run `saeguard ood fit` to write it again.")
    return dict(doc)


def _read_calibration_scores(path: Path) -> dict[str, list[float]]:
    """``calibration_scores.json``: each score's values on the calibration texts."""
    doc = read_json(path, "Re-run `saeguard ood fit`.")
    ok = isinstance(doc, dict) and all(
        isinstance(v, list) and all(isinstance(x, int | float) for x in v) for v in doc.values()
    )
    if not ok:
        raise CorruptFileError(
            f"{path} must map each score to a list of numbers; re-run `saeguard ood fit`"
        )
    return {str(k): [float(x) for x in v] for k, v in doc.items()}


def _fit_stats(
    reader: ActivationReader,
    sae: SparseAutoencoder,
    cfg: MonitorConfig,
    texts: Sequence[str],
    progress: bool,
) -> tuple[IDStats, list[TextActivations]]:
    """ID statistics from most texts; the rest (``reference_fraction``) come back unscored, to
    measure the energy components on text the statistics never saw."""
    rng = random.Random(f"{cfg.seed}:reference")
    n_ref = max(2, round(cfg.reference_fraction * len(texts)))
    reference_idx = set(rng.sample(range(len(texts)), n_ref))
    acc = StatsAccumulator(sae.cfg.d_sae, cfg.id_contexts)
    reference: list[TextActivations] = []
    pending: list[tuple[TextActivations, int]] = []
    rows = 0
    for i, item in reader.read(
        texts,
        max_windows=cfg.max_windows,
        progress="fit ID statistics" if progress else None,
    ):
        if isinstance(item, ReadFailure):
            continue
        if i in reference_idx:
            reference.append(item)
            continue
        pending.append((item, acc.add_windows(item.windows)))
        rows += len(item.acts)
        if rows >= 2048:
            _accumulate(sae, acc, pending)
            pending, rows = [], 0
    if pending:
        _accumulate(sae, acc, pending)
    return acc.finish(reader.spec.ctx_len), reference


def _accumulate(
    sae: SparseAutoencoder, acc: StatsAccumulator, items: list[tuple[TextActivations, int]]
) -> None:
    x = torch.cat([it.acts for it, _ in items])
    codes = sparse_codes(sae, x)
    err = relative_error(x, reconstruct(sae, codes))
    window = torch.cat([it.window + first for it, first in items])
    position = torch.cat([it.position for it, _ in items])
    pooled = torch.stack([it.acts.mean(0) for it, _ in items])
    acc.add(codes, err, window, position, pooled)


def _model_info(loaded: LoadedModel) -> dict[str, Any]:
    return {
        "name": loaded.name,
        "fingerprint": loaded.identity(),
        "adapter": loaded.adapter,
        "d_model": loaded.d_model,
        "n_layers": loaded.n_layers,
        "family": loaded.family,
    }


def _check_model(loaded: LoadedModel, info: dict[str, Any], hook: str, directory: Path) -> None:
    """Refuse a model (or hook) other than the one the monitor was fitted for."""
    if loaded.d_model != info.get("d_model") or loaded.n_layers != info.get("n_layers"):
        raise ConfigError(
            f"the monitor in {directory} was fitted for {info.get('name')} "
            f"(d_model {info.get('d_model')}, {info.get('n_layers')} layers) at {hook}, but the "
            f"model given is {loaded.name} (d_model {loaded.d_model}, {loaded.n_layers} layers). "
            "Fit a monitor for this model with `saeguard ood fit`."
        )
    loaded.hook_point(hook)
    fingerprint = loaded.identity()  # a merged adapter keeps its base model's identity
    if fingerprint != info.get("fingerprint"):
        raise ConfigError(
            f"the monitor in {directory} was fitted for {info.get('name')} (weights fingerprint "
            f"{str(info.get('fingerprint'))[:12]}) but the model given is {loaded.name} "
            f"(fingerprint {fingerprint[:12]}): its statistics do not describe this model. "
            "Fit a monitor for this model with `saeguard ood fit`."
        )

"""The OOD monitor: fit on ID text, calibrate a threshold, score texts and explain each alarm.

Its settings are :class:`~saeguard.ood.config.MonitorConfig`, its explanations come from
:mod:`saeguard.ood.explain` and its directory on disk is written and read by
:mod:`saeguard.ood.storage`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeguard.activations.exclusion import ExclusionRules
from saeguard.activations.reader import ActivationReader, Keep, ReadFailure, TextActivations
from saeguard.activations.subject import load_subject
from saeguard.data.shifts import id_split_texts
from saeguard.defaults import DEFAULT_CORPUS
from saeguard.errors import ConfigError
from saeguard.models.loading import LoadedModel
from saeguard.ood.analysis import TextAnalysis, analyse
from saeguard.ood.config import MonitorConfig
from saeguard.ood.explain import (
    LatentExplanation,
    Snippets,
    TextScore,
    explain_text,
    token_rows,
    top_id_contexts,
)
from saeguard.ood.fitting import fit_stats
from saeguard.ood.fusion import Fusion
from saeguard.ood.scores import (
    ENERGY_COMPONENTS,
    FUSED,
    LM_BASELINES,
    SINGLE_SCORES,
    energy,
)
from saeguard.ood.stats import IDStats
from saeguard.ood.storage import load_monitor, model_identity, monitor_document, save_monitor
from saeguard.sae.base import SparseAutoencoder

log = logging.getLogger(__name__)

SCORE_CHUNK = 64
"""Texts :meth:`Monitor.score` reads and analyses together (consecutive, in input order). The
model and the SAE run on batches drawn from one chunk, so a text's numbers depend on the other
texts of its chunk only through float rounding (batches of other shapes may sum in another
order, ~1e-7 relative); data-parallel scoring hands out whole chunks, so it reproduces one
process's numbers exactly (given as many threads per process: thread counts change rounding
too)."""


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
        reference_scores: dict[str, list[float]] | None = None,
    ) -> None:
        self.device = loaded.device
        """Where the monitor computes: its model's device (the SAE and the per-latent
        statistics move there; saving writes CPU tensors)."""
        self.sae = sae.to(self.device).eval()
        self.sae_metadata = sae_metadata
        self.loaded = loaded
        self.cfg = cfg
        self.stats = stats.to(self.device)
        self.rules = rules
        self.hook = str(sae_metadata["hook"])
        self.ctx_len = ctx_len
        self.prepend_bos = prepend_bos
        self.reference = reference or {}
        self.reference_scores: dict[str, list[float]] = {}
        """Every single score on the held-out reference ID texts (the fused score's p-values
        are read against them); empty for a monitor saved before the fused score existed."""
        self.fusion: Fusion | None = None
        self.set_reference_scores(reference_scores or {})
        self.thresholds: dict[str, float] = {}
        self.calibration: dict[str, Any] = {}
        self.calibration_scores: dict[str, list[float]] = {}
        self.model_info = model_info or model_identity(loaded)
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
        device: str | torch.device = "cpu",
    ) -> Monitor:
        """Fit ID statistics on ``texts`` (default: the train split of the SAE's corpus), on
        ``device`` (a given ``loaded`` model keeps its own)."""
        cfg = cfg or MonitorConfig()
        subject = load_subject(
            sae_dir, model=model, corpus=corpus, split="train", loaded=loaded, device=device
        )
        meta = subject.metadata
        corpus_name = corpus or str(meta.get("corpus") or DEFAULT_CORPUS)
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
        with_lm = any(s in LM_BASELINES for s in cfg.fusion_components)
        stats, reference_items = fit_stats(reader, subject.sae, cfg, texts, progress, with_lm)
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
        analyses = monitor.analyse(reference_items, with_lm=with_lm)
        monitor.reference = {
            name: (
                float(np.mean([a.scores[name] for a in analyses])),
                float(np.std([a.scores[name] for a in analyses])),
            )
            for name in ENERGY_COMPONENTS
        }
        for analysis in analyses:  # energy is z-scored against the reference it now has
            analysis.scores["energy"] = energy(analysis.scores, monitor.reference)
        monitor.set_reference_scores(
            {
                name: [a.scores[name] for a in analyses]
                for name in SINGLE_SCORES
                if all(name in a.scores for a in analyses)
            }
        )
        log.info(
            "monitor fitted on %d ID tokens (%d texts); energy reference %s",
            monitor.stats.n_tokens,
            monitor.stats.n_texts,
            {k: tuple(round(x, 4) for x in v) for k, v in monitor.reference.items()},
        )
        return monitor

    def set_reference_scores(self, reference_scores: dict[str, list[float]]) -> None:
        """Take the single scores of held-out ID texts and fit the fused score on them."""
        self.reference_scores = {k: list(v) for k, v in reference_scores.items()}
        components = self.cfg.fusion_components
        if all(name in self.reference_scores for name in components):
            self.fusion = Fusion.fit(
                self.reference_scores, components, self.cfg.fusion_rule, self.cfg.fusion_tail
            )
        else:
            self.fusion = None

    @property
    def needs_lm(self) -> bool:
        """Whether scoring for the flag needs the LM's logits (the forward past the hook)."""
        return self.cfg.flag_needs_lm

    # --- scoring ------------------------------------------------------------------------------
    def analyse_acts(self, acts: Sequence[torch.Tensor]) -> list[TextAnalysis]:
        """Every SAE score and activation baseline of texts given by their kept activations (and
        the fused score when none of its components needs the LM)."""
        analyses = analyse(
            self.sae,
            acts,
            self.stats,
            self.cfg.tau_rate,
            self.cfg.range_margin,
            self.cfg.knn_k,
            self.reference,
            self.cfg.top_q,
        )
        self._add_fused(analyses)
        return analyses

    def analyse(self, items: Sequence[TextActivations], with_lm: bool) -> list[TextAnalysis]:
        """Every score of a batch of texts (one SAE pass over all their tokens)."""
        analyses = self.analyse_acts([it.acts for it in items])
        if with_lm:
            for item, analysis in zip(items, analyses, strict=True):
                analysis.scores.update(item.lm)
                if item.lm_surprisal is not None:
                    analysis.token_scores["lm_surprisal"] = item.lm_surprisal
            self._add_fused(analyses)
        return analyses

    def _add_fused(self, analyses: Sequence[TextAnalysis]) -> None:
        """Put the fused score first in each analysis whose scores hold every component."""
        if self.fusion is None:
            return
        for analysis, assessed in zip(
            analyses, self.fusion.assess([a.scores for a in analyses]), strict=True
        ):
            if assessed is not None:
                value, analysis.p_values = assessed
                rest = {k: v for k, v in analysis.scores.items() if k != FUSED}
                analysis.scores = {FUSED: value, **rest}

    def score(
        self,
        texts: Sequence[str | bytes],
        with_lm: bool | None = None,
        explain: bool = True,
        explain_all: bool = False,
        keep: Keep = "head",
        max_windows: int | None = None,
        progress: str | None = None,
        tokens: bool = False,
    ) -> list[TextScore]:
        """Score texts: every SAE score and activation baseline (LM baselines with ``with_lm``;
        by default when the flag score needs them), the fused score and its components'
        p-values, the flag when calibrated, for flagged texts the latents that raised it, and
        with ``tokens`` every token's own scores.

        Bytes are decoded as UTF-8 with invalid sequences replaced (the result warns). Empty
        texts get an ``error`` instead of scores; the rest of the batch is scored normally.
        Texts are read and analysed in chunks of :data:`SCORE_CHUNK`.
        """
        with_lm = self.needs_lm if with_lm is None else with_lm
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
                self._fill(results[i], item, analysis, explain, explain_all, tokens)
            batch.clear()

        reading = self.reader.read(decoded, with_lm, keep, limit, progress, SCORE_CHUNK)
        for i, item in reading:
            if batch and i // SCORE_CHUNK != batch[0][0] // SCORE_CHUNK:
                flush()  # one analysis per chunk: what is analysed together is the chunk's
            if isinstance(item, ReadFailure):
                results[i].error = item.message
                continue
            batch.append((i, item))
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
        tokens: bool = False,
    ) -> None:
        result.scores = analysis.scores
        result.p_values = {k: round(v, 6) for k, v in analysis.p_values.items()}
        if tokens:
            result.tokens = token_rows(item, analysis, self.loaded.tokenizer.decode)
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
        return explain_text(
            item,
            analysis,
            self.stats,
            self.sae.cfg.d_sae,
            self.cfg.explain_latents,
            self._snippets(),
        )

    def id_contexts(self, latent: int) -> list[dict[str, Any]]:
        """Top-activating in-distribution contexts of a latent (empty if it never fired)."""
        return top_id_contexts(self.stats, latent, self._snippets())

    def _snippets(self) -> Snippets:
        start = 1 if self.reader.spec.start_id is not None else 0
        return Snippets(self.loaded.tokenizer.decode, start)

    # --- calibration --------------------------------------------------------------------------
    def calibrate(
        self,
        texts: Sequence[str] | None = None,
        target_fpr: float | None = None,
        corpus: str = "",
        with_lm: bool | None = None,
    ) -> dict[str, float]:
        """Set each score's threshold at the (1 - target_fpr) quantile of held-out ID text
        (default: the validation split of the SAE's corpus) and record how in ``calibration``;
        ``target_fpr`` defaults to :attr:`target_fpr`. Returns the thresholds; the config is
        never changed."""
        fpr = self.target_fpr if target_fpr is None else target_fpr
        if not 0 < fpr < 0.5:
            raise ConfigError(f"target FPR must lie in (0, 0.5), got {fpr}")
        corpus_name = corpus or str(self.sae_metadata.get("corpus") or DEFAULT_CORPUS)
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
        return dict(self.thresholds)

    @property
    def target_fpr(self) -> float:
        """The false-positive rate the thresholds are set for: the calibrated one, else (before
        calibration) the config's. Calibrating never changes the config."""
        fpr: float = self.calibration.get("target_fpr", self.cfg.target_fpr)
        return fpr

    # --- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the monitor directory: built in a staging folder inside it, then moved into place
        with ``monitor.json`` last; a directory holding files of anything else is refused."""
        return save_monitor(self, directory)

    def document(self) -> dict[str, Any]:
        """The contents of ``monitor.json``."""
        return monitor_document(self)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        loaded: LoadedModel | None = None,
        model: str = "",
        adapter: str = "",
        device: str | torch.device = "cpu",
    ) -> Monitor:
        """Load a monitor onto ``device`` (a given ``loaded`` model keeps its own); a model
        other than the one it was fitted for is refused. With ``adapter`` (a `saeguard
        robustify` adapter directory) the model scored is the base model with that adapter
        merged in, judged against the base model's statistics."""
        stored = load_monitor(directory, loaded, model, adapter, device)
        monitor = cls(
            stored["sae"],
            stored["sae_metadata"],
            stored["loaded"],
            stored["cfg"],
            stored["stats"],
            stored["rules"],
            stored["ctx_len"],
            stored["prepend_bos"],
            stored["reference"],
            stored["model_info"],
            stored["reference_scores"],
        )
        monitor.thresholds = stored["thresholds"]
        monitor.calibration = stored["calibration"]
        monitor.calibration_scores = stored["calibration_scores"]
        return monitor

"""From a model and a corpus to activations: configuration, the forward pass and exclusions.

:class:`ActivationHarvester` is the one place where a batch of contexts becomes kept activations;
the on-disk harvest (:mod:`saeguard.jobs.harvest`) and the cache-free streaming source
(:class:`ModelActivationSource`) both go through it, so they apply identical rules.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from saeguard.activations.exclusion import ExclusionRules, median_norms
from saeguard.configs import config_to_dict, validate_literals
from saeguard.data import (
    Document,
    corpus_fingerprint,
    iter_contexts,
    load_corpus,
    packing_spec,
    select_split,
)
from saeguard.data.tokenize import PackingSpec
from saeguard.defaults import DEFAULT_CORPUS, DEFAULT_HOOK, DEFAULT_MODEL
from saeguard.devices import check_device_name, resolve_device
from saeguard.distributed import World
from saeguard.errors import ConfigError
from saeguard.models import HookPoint, LoadedModel, load_model, run_to_hooks

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]


@dataclass(kw_only=True)
class ActivationSourceConfig:
    """Where activations come from: model, hook points, corpus and exclusion rules."""

    model: str = DEFAULT_MODEL
    """Model: embedded name (smollm2-135m, gemma3-270m), Hugging Face id or local directory."""
    hooks: list[str] = field(default_factory=lambda: [DEFAULT_HOOK])
    """Hook points to read, e.g. resid_post.15 (repeat the flag or separate with commas)."""
    corpus: str = DEFAULT_CORPUS
    """Corpus: a registered name (see `saeguard corpora`), a .txt/.jsonl/.csv file or hf:DATASET."""
    split: Literal["train", "validation", "test", "all"] = "train"
    """Document split to read; splits are fixed by a seeded hash of each document's text."""
    split_seed: int = 0
    """Seed of the document-hash split (change it only to study split variance)."""
    seed: int = 0
    """Seed of the document order before packing."""
    ctx_len: int = 128
    """Tokens per packed context, start token included."""
    prepend_bos: bool = True
    """Start every context with the BOS (or separator) token, as in pre-training."""
    batch_size: int = 32
    """Contexts per forward pass."""
    dtype: DType = "float32"
    """Dtype of the model forward pass (bfloat16 is faster on recent CPUs and GPUs)."""
    device: str = "auto"
    """Torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under
    torchrun each process takes the GPU of its local rank."""
    exclude_special: bool = True
    """Drop activations at special tokens (BOS, separators, pad, chat markers)."""
    outlier_multiple: float = 10.0
    """Drop activations whose norm exceeds this multiple of the median norm (0 disables)."""
    calibration_contexts: int = 64
    """Contexts (the first of the stream) used to measure the median norm."""
    repeat: bool = True
    """When the split runs out, start another pass in a new order instead of stopping."""
    threads: int = 0
    """CPU threads for torch (0 keeps torch's default)."""
    mask_prob: float = 0.0
    """Masked regularization: replace each eligible input token by the mask token with this
    probability before the model runs (0 = off, exactly the baseline)."""
    mask_token: str = ""
    """Mask token string; must encode to one token id ('' = the tokenizer's own mask token, else
    a rarely used special token)."""
    keep_masked_positions: bool = False
    """Keep the activations at masked positions themselves (dropped by default)."""
    mask_seed: int = 0
    """Seed of the masking draws (each context's draw depends only on it and the context)."""

    def __post_init__(self) -> None:
        validate_literals(self)
        check_device_name(self.device)
        if not self.hooks:
            raise ConfigError("at least one hook point is needed (--hook resid_post.15)")
        if self.ctx_len < 2:
            raise ConfigError(f"--ctx-len must be at least 2, got {self.ctx_len}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.outlier_multiple != 0 and self.outlier_multiple <= 1:
            raise ConfigError(
                f"--outlier-multiple must be 0 (off) or above 1, got {self.outlier_multiple}: "
                "a threshold at or below the median norm would drop most activations"
            )
        if self.calibration_contexts < 1:
            raise ConfigError("--calibration-contexts must be at least 1")
        if len(set(self.hooks)) != len(self.hooks):
            raise ConfigError(f"hook points are repeated: {self.hooks}")
        if not 0 <= self.mask_prob < 1:
            raise ConfigError(f"--mask-prob must lie in [0, 1), got {self.mask_prob}")


class ActivationHarvester:
    """Runs a model up to its deepest requested hook and applies the exclusion rules."""

    def __init__(
        self,
        loaded: LoadedModel,
        hooks: list[str],
        rules: ExclusionRules,
        masking: MaskingSpec | None = None,
    ) -> None:
        self.loaded = loaded
        self.points: list[HookPoint] = [loaded.hook_point(h) for h in hooks]
        self.rules = rules
        self.masking = masking
        self.masked_tokens = 0
        self.eligible_tokens = 0

    @property
    def hooks(self) -> list[str]:
        return [p.name for p in self.points]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw activations [batch, seq, d] per hook, as float32 on the CPU."""
        out = run_to_hooks(self.loaded.model, tokens.to(self.loaded.device), self.points)
        return {name: t.float().cpu() for name, t in out.items()}

    def kept(
        self, tokens: torch.Tensor, first_context: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per hook: kept activations [n, d] and their global indices (context * ctx_len + pos).

        With masking on, the model reads the masked tokens; special-token exclusion still looks
        at the original tokens, and masked positions are dropped unless asked to keep them.
        """
        batch, seq = tokens.shape
        dropped = torch.zeros_like(tokens, dtype=torch.bool)
        model_tokens = tokens
        if self.masking is not None and self.masking.prob > 0:
            eligible = ~self.rules.is_special(tokens)  # never BOS, separators, pad
            masked = self.masking.draw(tokens, first_context, eligible)
            model_tokens = tokens.masked_fill(masked, self.masking.token_id)
            self.masked_tokens += int(masked.sum())
            self.eligible_tokens += int(eligible.sum())
            if not self.masking.keep_positions:
                dropped = masked
        raw = self.forward(model_tokens)
        positions = torch.arange(first_context, first_context + batch).unsqueeze(
            1
        ) * seq + torch.arange(seq).unsqueeze(0)
        result = {}
        for name, acts in raw.items():
            keep = self.rules.keep_mask(tokens, acts, name) & ~dropped
            result[name] = (acts[keep], positions[keep])
        return result

    def count_masking(self, tokens: torch.Tensor, first_context: int) -> None:
        """Count the masking draws of contexts another rank runs (as :meth:`kept` would), so
        every rank reports the same masked fraction without running the model on them."""
        if self.masking is not None and self.masking.prob > 0:
            eligible = ~self.rules.is_special(tokens)
            self.masked_tokens += int(self.masking.draw(tokens, first_context, eligible).sum())
            self.eligible_tokens += int(eligible.sum())

    @property
    def masked_fraction(self) -> float:
        """Fraction of eligible tokens replaced by the mask token so far."""
        return self.masked_tokens / max(self.eligible_tokens, 1)

    def calibrate(self, contexts: list[list[int]], batch_size: int) -> None:
        """Measure the median norm per hook on ``contexts`` and fix the outlier thresholds."""
        acts: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        masks = []
        for start in range(0, len(contexts), batch_size):
            tokens = torch.tensor(contexts[start : start + batch_size], dtype=torch.long)
            for name, a in self.forward(tokens).items():
                acts[name].append(a)
            masks.append(self.rules.special_mask(tokens))
        self.rules.median_norms = median_norms(acts, masks)


@dataclass(frozen=True)
class MaskingSpec:
    """Masked regularization (SPEC section 3), a property of the activation source."""

    prob: float
    token: str
    token_id: int
    keep_positions: bool
    seed: int

    def draw(
        self, tokens: torch.Tensor, first_context: int, eligible: torch.Tensor
    ) -> torch.Tensor:
        """Which positions to mask: each context's draw depends only on the seed and its index,
        so resumed and re-batched runs mask exactly the same tokens."""
        rows = []
        for row in range(tokens.shape[0]):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + first_context + row)
            rows.append(torch.rand(tokens.shape[1], generator=generator) < self.prob)
        return torch.stack(rows) & eligible

    def to_dict(self) -> dict[str, object]:
        return {
            "mask_prob": self.prob,
            "mask_token": self.token,
            "mask_token_id": self.token_id,
            "keep_masked_positions": self.keep_positions,
            "mask_seed": self.seed,
        }


# Rarely used special tokens that can stand in as a mask token, by preference.
_FALLBACK_MASK_TOKENS = ("<mask>", "<empty_output>", "<jupyter_script>", "<reponame>")


def resolve_mask_token(tokenizer: Any, requested: str) -> tuple[str, int]:
    """The mask token string and its id; it must encode to exactly one token."""
    candidates = [requested] if requested else []
    if not requested:
        if getattr(tokenizer, "mask_token", None):
            candidates.append(tokenizer.mask_token)
        vocab = tokenizer.get_vocab()
        candidates += [t for t in _FALLBACK_MASK_TOKENS if t in vocab]
    for token in candidates:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return token, int(ids[0])
        if requested:
            raise ConfigError(
                f"--mask-token {token!r} encodes to {len(ids)} tokens {ids}; it must be exactly "
                "one token (e.g. a special token of the vocabulary)"
            )
    raise ConfigError(
        "this tokenizer has no mask token and none of the fallback special tokens "
        f"({', '.join(_FALLBACK_MASK_TOKENS)}); pass --mask-token with a single-token string"
    )


@dataclass
class PreparedSource:
    """Everything a config names, loaded and checked: model, documents, packing and rules."""

    loaded: LoadedModel
    documents: list[Document]
    spec: PackingSpec
    rules: ExclusionRules
    cfg: ActivationSourceConfig
    masking: MaskingSpec | None = None

    def contexts(self) -> Iterator[list[int]]:
        """A fresh, deterministic stream of packed contexts (each call starts over)."""
        return iter_contexts(
            self.loaded.tokenizer,
            self.documents,
            self.spec,
            seed=self.cfg.seed,
            repeat=self.cfg.repeat,
        )

    def fingerprint(self) -> dict[str, str]:
        """Content fingerprints of the model and the selected documents.

        A resume compares these, not just names, so that a corpus file or model directory that
        changed between a crash and the re-run is refused instead of mixed into one cache.
        """
        return {
            "corpus_sha256": corpus_fingerprint(self.documents),
            "model_sha256": self.loaded.fingerprint(),
            "device_type": self.loaded.device.type,
        }


def prepare(cfg: ActivationSourceConfig, loaded: LoadedModel | None = None) -> PreparedSource:
    """Load what a config names; bad corpora, splits and hooks fail before any long work."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    corpus = load_corpus(cfg.corpus)  # cheap: bad corpora fail before the model loads
    documents = select_split(corpus.documents, cfg.split, seed=cfg.split_seed)
    if not documents:
        raise ConfigError(f"the {cfg.split!r} split of corpus {cfg.corpus!r} has no document")
    loaded = loaded or load_model(cfg.model, dtype=cfg.dtype, device=resolve_device(cfg.device))
    for hook in cfg.hooks:
        loaded.hook_point(hook)
    spec = packing_spec(loaded.tokenizer, cfg.ctx_len, cfg.prepend_bos)
    rules = ExclusionRules(
        exclude_special=cfg.exclude_special,
        special_ids=sorted(
            set(loaded.special_token_ids())
            | {i for i in (spec.start_id, spec.sep_id) if i is not None}
        ),
        outlier_multiple=cfg.outlier_multiple,
    )
    masking = None
    if cfg.mask_prob > 0:
        token, token_id = resolve_mask_token(loaded.tokenizer, cfg.mask_token)
        masking = MaskingSpec(
            cfg.mask_prob, token, token_id, cfg.keep_masked_positions, cfg.mask_seed
        )
    return PreparedSource(loaded, documents, spec, rules, cfg, masking)


class ModelActivationSource:
    """Streams kept activations [n, d] of one hook straight from the model (no cache).

    Iterating yields one tensor per forward batch; wrap it in a :class:`ShuffleBuffer` to get
    shuffled training batches. With ``repeat`` (the default) the stream is endless.
    """

    def __init__(
        self,
        cfg: ActivationSourceConfig,
        hook: str | None = None,
        loaded: LoadedModel | None = None,
        median_norms: dict[str, float] | None = None,
    ) -> None:
        """``median_norms`` reuses recorded outlier thresholds (evaluation must apply the rules
        the SAE was trained with) instead of measuring them on this stream."""
        self.cfg = cfg
        self.hook = hook or cfg.hooks[0]
        self.prepared = prepare(cfg, loaded)
        self.loaded = self.prepared.loaded
        self.harvester = ActivationHarvester(
            self.loaded, [self.hook], self.prepared.rules, self.prepared.masking
        )
        if median_norms is not None and self.hook in median_norms:
            self.harvester.rules.median_norms = {self.hook: float(median_norms[self.hook])}
        elif cfg.outlier_multiple > 0:
            calibration = list(itertools.islice(self.prepared.contexts(), cfg.calibration_contexts))
            self.harvester.calibrate(calibration, cfg.batch_size)

    @property
    def d_model(self) -> int:
        return self.loaded.d_model

    def describe(self) -> dict[str, object]:
        """Provenance of the activations, for saved metadata."""
        masking = self.prepared.masking
        return {
            "source": config_to_dict(self.cfg),
            "hook": self.hook,
            "exclusions": self.harvester.rules.to_dict(),
            "masking": {
                **(masking.to_dict() if masking else {"mask_prob": 0.0}),
                "masked_fraction": self.harvester.masked_fraction,
            },
        }

    def __iter__(self) -> Iterator[torch.Tensor]:
        """One pass over the stream; every iteration starts again from the first context."""
        for acts in self.chunks():
            if acts is not None and len(acts):
                yield acts

    def chunks(self, world: World | None = None) -> Iterator[torch.Tensor | None]:
        """Kept activations of each forward batch in stream order; with a ``world``, None for
        the batches other ranks run (batch ``i`` is rank ``i % size``'s)."""
        stream = self.prepared.contexts()
        context_id = 0
        for index in itertools.count():
            batch = list(itertools.islice(stream, self.cfg.batch_size))
            if not batch:
                return
            tokens = torch.tensor(batch, dtype=torch.long)
            if world is None or world.owns(index):
                yield self.harvester.kept(tokens, context_id)[self.hook][0]
            else:
                self.harvester.count_masking(tokens, context_id)
                yield None
            context_id += len(batch)

"""CE loss and KL recovered: splice the SAE's reconstruction into the forward pass (SPEC §4).

For each context the model runs three times: clean; with x̂ = SAE(x) spliced in at the hook;
with zeros spliced in (the reference of a useless SAE). Then

    ce_loss_recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean)
    kl_recovered      = (KL_zero − KL_sae) / KL_zero,   KL_* = KL(p_clean ‖ p_*)

averaged over every next-token prediction. Splicing happens only at positions training kept
(excluded special tokens and norm outliers keep their clean activation, as the SAE never
learned them); the result records the spliced fraction. 1 means "as good as the model"; 0 "no
better than deleting the activation".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from saeguard.activations.subject import EvalSubject
from saeguard.evals.results import MetricResult, sampled_metric
from saeguard.models.hooks import capture_hooks, splice_hook

VERSION = 1


@dataclass(kw_only=True)
class CEConfig:
    """Settings of CE loss / KL recovered."""

    contexts: int = 48
    """Packed contexts of the evaluation split (each runs three full forward passes)."""
    batch_size: int = 8
    """Contexts per forward pass."""


Reconstruct = Callable[[torch.Tensor], torch.Tensor]


def _log_probs(
    model: torch.nn.Module,
    point: object,
    tokens: torch.Tensor,
    keep: torch.Tensor | None,
    replace: Reconstruct | None,
) -> torch.Tensor:
    """Next-token log-probabilities [batch, seq - 1, vocab], with ``replace`` spliced in."""
    if replace is None:
        logits = model(input_ids=tokens, use_cache=False).logits
    else:

        def spliced(acts: torch.Tensor) -> torch.Tensor:
            new = replace(acts.float()).to(acts.dtype)
            if keep is None:
                return new
            return torch.where(keep.unsqueeze(-1).to(acts.device), new, acts)

        with splice_hook(model, point, spliced):  # type: ignore[arg-type]
            logits = model(input_ids=tokens, use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _ce(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return -logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)


def _kl(clean: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    return (clean.exp() * (clean - logp)).sum(-1).sum(-1)


@torch.no_grad()
def reference_sums(
    model: torch.nn.Module,
    point: object,
    tokens: torch.Tensor,
    keep: torch.Tensor | None,
    clean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAE-independent part: clean log-probs (computed unless given), and per-row CE (clean,
    zero) and KL (zero)."""
    if clean is None:
        clean = _log_probs(model, point, tokens, keep, None)
    zero = _log_probs(model, point, tokens, keep, torch.zeros_like)
    predictions = torch.full((len(tokens),), float(tokens.shape[1] - 1), device=tokens.device)
    sums = {
        "clean": _ce(clean, tokens), "zero": _ce(zero, tokens), "kl_zero": _kl(clean, zero),
        "predictions": predictions,
    }  # fmt: skip
    return clean, sums


@torch.no_grad()
def ce_and_kl_sums(
    model: torch.nn.Module,
    point: object,
    tokens: torch.Tensor,
    keep: torch.Tensor | None,
    reconstruct: Reconstruct,
    reference: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row summed CE (clean, sae, zero) and KL (sae, zero) over next-token predictions.

    ``keep`` [batch, seq] says where to splice (None: everywhere); ``reference`` reuses a
    previous :func:`reference_sums` of the same tokens.
    """
    clean, sums = reference or reference_sums(model, point, tokens, keep)
    sae = _log_probs(model, point, tokens, keep, reconstruct)
    return {**sums, "sae": _ce(sae, tokens), "kl_sae": _kl(clean, sae)}


def results_from_sums(sums: dict[str, list[float]]) -> list[MetricResult]:
    """CE recovered, KL recovered and the three mean CEs, with intervals over contexts."""
    n_pred = sums["predictions"]
    out = [
        sampled_metric(
            "ce_loss_recovered",
            VERSION,
            {"clean": sums["clean"], "sae": sums["sae"], "zero": sums["zero"]},
            "recovered",
            "context",
        ),
        sampled_metric(
            "kl_recovered",
            VERSION,
            {"clean": [0.0] * len(n_pred), "sae": sums["kl_sae"], "zero": sums["kl_zero"]},
            "recovered",
            "context",
        ),
    ]
    for name in ("clean", "sae", "zero"):
        out.append(
            sampled_metric(
                f"ce_loss_{name}", VERSION, {"num": sums[name], "den": n_pred}, "ratio", "context"
            )
        )
    return out


def run_ce(subject: EvalSubject, cfg: CEConfig) -> tuple[list[MetricResult], dict[str, float]]:
    """CE/KL recovered of the subject's SAE on packed contexts of the evaluation split."""
    loaded = subject.loaded
    point = loaded.hook_point(subject.hook)
    contexts = [c for _, c in zip(range(cfg.contexts), subject.source.contexts(), strict=False)]
    sae = subject.sae
    sums: dict[str, list[float]] = {}
    spliced = total = 0
    batches = range(0, len(contexts), cfg.batch_size)
    for start in tqdm(batches, desc="ce: spliced forwards", unit="batch"):
        key = ("ce_reference", cfg.contexts, cfg.batch_size, start)
        tokens = torch.tensor(contexts[start : start + cfg.batch_size], dtype=torch.long)
        tokens = tokens.to(loaded.device)
        if key not in subject.memo:  # clean and zero-ablated runs do not depend on the SAE
            # The clean run also reads the hook, which decides where splicing happens.
            with torch.no_grad(), capture_hooks(loaded.model, [point], stop_early=False) as store:
                clean = _log_probs(loaded.model, point, tokens, None, None)
            acts = store[subject.hook].float().cpu()
            keep = subject.source.rules.keep_mask(tokens.cpu(), acts, subject.hook)
            reference = reference_sums(loaded.model, point, tokens, keep, clean)
            subject.memo[key] = (keep, reference)
        keep, reference = subject.memo[key]
        spliced += int(keep.sum())
        total += keep.numel()
        batch = ce_and_kl_sums(loaded.model, point, tokens, keep, sae, reference)
        for name, value in batch.items():
            sums.setdefault(name, []).extend(value.tolist())
    return results_from_sums(sums), {"spliced_fraction": spliced / max(total, 1)}

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

from saeguard.evals.results import MetricResult, sampled_metric
from saeguard.evals.subject import EvalSubject
from saeguard.models.hooks import splice_hook

VERSION = 1


@dataclass
class CEConfig:
    """Settings of CE loss / KL recovered."""

    contexts: int = 48
    """Packed contexts of the evaluation split (each runs three full forward passes)."""
    batch_size: int = 8
    """Contexts per forward pass."""


Reconstruct = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def ce_and_kl_sums(
    model: torch.nn.Module,
    point: object,
    tokens: torch.Tensor,
    keep: torch.Tensor | None,
    reconstruct: Reconstruct,
) -> dict[str, torch.Tensor]:
    """Per-row summed CE (clean, sae, zero) and KL (sae, zero) over next-token predictions.

    ``keep`` [batch, seq] says where to splice (None: everywhere).
    """
    targets = tokens[:, 1:]

    def run(replace: Reconstruct | None) -> torch.Tensor:
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

    clean = run(None)
    sae = run(lambda a: reconstruct(a))
    zero = run(torch.zeros_like)

    def ce(logp: torch.Tensor) -> torch.Tensor:
        return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)

    def kl(logp: torch.Tensor) -> torch.Tensor:
        return (clean.exp() * (clean - logp)).sum(-1).sum(-1)

    return {
        "clean": ce(clean),
        "sae": ce(sae),
        "zero": ce(zero),
        "kl_sae": kl(sae),
        "kl_zero": kl(zero),
        "predictions": torch.full((len(tokens),), float(targets.shape[1])),
    }


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
    for start in tqdm(
        range(0, len(contexts), cfg.batch_size), desc="ce: spliced forwards", unit="batch"
    ):
        tokens = torch.tensor(contexts[start : start + cfg.batch_size], dtype=torch.long)
        with torch.inference_mode():
            from saeguard.models.hooks import run_to_hooks

            acts = run_to_hooks(loaded.model, tokens.to(loaded.device), [point])[subject.hook]
        keep = subject.source.rules.keep_mask(tokens, acts.float().cpu(), subject.hook)
        spliced += int(keep.sum())
        total += keep.numel()
        batch = ce_and_kl_sums(
            loaded.model, point, tokens.to(loaded.device), keep, lambda a: sae(a)
        )
        for key, value in batch.items():
            sums.setdefault(key, []).extend(value.tolist())
    return results_from_sums(sums), {"spliced_fraction": spliced / max(total, 1)}

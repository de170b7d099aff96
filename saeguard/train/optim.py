"""Optimisers for SAE training: Adam or sign-SGD, optionally schedule-free.

Why these: at a CPU's budget of a few hundred thousand activations, the optimiser decides how
much an SAE learns per token. EleutherAI sparsify trains TopK SAEs with sign-SGD inside a
schedule-free wrapper (Defazio et al. 2024, the ``schedulefree`` package) and reaches in 327k
tokens what Adam with warm-up and decay reaches in about 2M (docs/training.md has our
measurements). Sign-SGD moves every weight by the same step whatever its gradient's scale, which
suits the encoder, whose gradients are sparse and badly scaled; the schedule-free average replaces
the learning-rate decay, so a run may stop at any step and still hold its best averaged weights.

:class:`SaeOptimizer` hides the difference from the trainer: one ``step``, a checkpoint state of
tensors plus JSON scalars that resumes bit-identically, and :meth:`SaeOptimizer.eval_parameters`,
the weights to evaluate and save (schedule-free trains at one point, ``y``, and evaluates at its
running average ``x``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from saeguard.errors import MissingPackageError

OptimizerName = Literal["adam", "signsgd"]

# Learning rates at the reference width of 16,384 latents; other widths scale by
# sqrt(16384 / d_sae) (a wider dictionary spreads each token's gradient over more latents, so
# each latent sees fewer, noisier updates). Chosen by measurement: docs/training.md.
REFERENCE_LATENTS = 16_384
REFERENCE_LR: dict[str, float] = {"adam": 3e-4, "signsgd": 5e-3}


def default_lr(optimizer: str, d_sae: int) -> float:
    """The width-aware default learning rate of ``optimizer`` for ``d_sae`` latents."""
    return REFERENCE_LR[optimizer] * math.sqrt(REFERENCE_LATENTS / d_sae)


class SignSGD(torch.optim.Optimizer):
    """``p -= lr * sign(grad)``: every weight moves by the same step, whatever the gradient's
    scale. Its momentum comes from the schedule-free wrapper around it (Signum)."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                signs = torch._foreach_sign([p.grad for p in params])
                torch._foreach_add_(params, signs, alpha=-group["lr"])


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    """Sign-SGD inside schedule-free averaging, fused into four passes over the weights.

    The same method as ``schedulefree.ScheduleFreeWrapper(SignSGD(...))`` (the package's
    defaults: averaging weight ``lr_max ** 2``, no weight decay; a unit test holds the two
    together), written for speed: the wrapper converts ``y -> x``, swaps buffers with three XOR
    passes each way and lerps twice, about twelve passes over the weights per step, which on a
    CPU cost a third of a sparse TopK step. Here the parameters hold ``y`` and ``state["z"]`` the
    fast iterate; with ``a = 1 - 1/momentum``, ``c`` the averaging weight of this step and
    ``w = c + (1 - momentum)(1 - c)``, one step is exactly

        y <- lerp(y, z, (1 - w) a + w) - w * lr * sign(g),    z <- z - lr * sign(g)

    (the wrapper's ``x = lerp(y, z, a)``, ``z -= lr sign(g)``, ``x = lerp(x, z, c)``,
    ``y = lerp(x, z, 1 - momentum)`` composed into one affine map). Group scalars ``k``,
    ``lr_max`` and ``weight_sum`` are kept under the wrapper's names.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, beta = group["lr"], group["momentum"]
            lr_max = group["lr_max"] = max(lr, group.get("lr_max", 0.0))
            weight = lr_max**2
            weight_sum = group["weight_sum"] = group.get("weight_sum", 0.0) + weight
            c = weight / weight_sum
            w = c + (1 - beta) * (1 - c)
            a = 1 - 1 / beta
            zs = []
            for p in params:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = p.detach().clone()
                zs.append(self.state[p]["z"])
            signs = [p.grad for p in params]
            torch._foreach_sign_(signs)  # the gradients are spent: sign them in place
            torch._foreach_lerp_(params, zs, (1 - w) * a + w)
            torch._foreach_add_(params, signs, alpha=-w * lr)
            torch._foreach_add_(zs, signs, alpha=-lr)
            group["k"] = group.get("k", 0) + 1


class SaeOptimizer:
    """One SAE's optimiser with a uniform interface for the trainer and its checkpoints."""

    def __init__(
        self,
        module: nn.Module,
        name: OptimizerName,
        lr: float,
        schedule_free: bool,
        momentum: float = 0.95,
    ) -> None:
        self.module = module
        self.schedule_free = schedule_free
        self.momentum = momentum
        params = list(module.parameters())
        self.base: torch.optim.Optimizer
        self.stepper: Any
        if not schedule_free:
            self.base = (
                torch.optim.Adam(params, lr=lr) if name == "adam" else SignSGD(params, lr=lr)
            )
            self.stepper = self.base
            return
        if name == "signsgd":  # our fused form of ScheduleFreeWrapper(SignSGD); params hold y
            self.base = ScheduleFreeSignSGD(params, lr=lr, momentum=momentum)
            self.stepper = self.base
            return
        try:
            import schedulefree
        except ImportError as exc:  # a declared dependency; only a broken install lacks it
            raise MissingPackageError("schedule-free optimisation", "schedulefree") from exc
        # The wrapper and Adam would share one state dict; the package's own schedule-free AdamW
        # is the same method built in (beta1 plays the wrapper's momentum).
        self.base = schedulefree.AdamWScheduleFree(
            params, lr=lr, betas=(momentum, 0.999), warmup_steps=0, weight_decay=0.0
        )
        self.stepper = self.base
        self.stepper.train()  # parameters hold y, the point gradients are taken at

    def step(self, lr: float) -> None:
        """One update with learning rate ``lr`` (the trainer's warm-up/decay already applied)."""
        for group in self.base.param_groups:
            group["lr"] = lr
        self.stepper.step()

    def zero_grad(self) -> None:
        self.base.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_parameters(self) -> dict[str, torch.Tensor]:
        """The weights to evaluate and save, computed without touching the training state.

        Plain optimisers: the parameters themselves. Schedule-free: the average
        ``x = y + (1 - 1/momentum) (z - y)``, the same formula as the wrapper's ``eval()``, but
        out of place, so a checkpoint taken at any moment cannot perturb the run.
        """
        result = {}
        for key, param in self.module.named_parameters():
            state = self.base.state.get(param, {})
            if self.schedule_free and "z" in state:
                result[key] = param.detach().lerp(state["z"], 1 - 1 / self.momentum)
            else:
                result[key] = param.detach().clone()
        return result

    # --- checkpoints ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Per-parameter state as ``INDEX/FIELD`` tensors (Adam moments, schedule-free z)."""
        tensors = {}
        for index, state in self.base.state_dict()["state"].items():
            for field_name, value in state.items():
                tensors[f"{index}/{field_name}"] = torch.as_tensor(value).clone()
        return tensors

    def state_scalars(self) -> list[dict[str, Any]]:
        """Per-group scalars (schedule-free keeps its step count and weight sum there)."""
        return [
            {k: v for k, v in group.items() if k != "params"}
            for group in self.base.state_dict()["param_groups"]
        ]

    def load_state(self, tensors: dict[str, torch.Tensor], scalars: list[dict[str, Any]]) -> None:
        """Inverse of :meth:`state_tensors` and :meth:`state_scalars`."""
        saved = self.base.state_dict()
        restored: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            index, field_name = key.split("/")
            restored.setdefault(int(index), {})[field_name] = value
        groups = saved["param_groups"]
        if scalars:
            groups = [{**group, **scalar, "params": group["params"]}
                      for scalar, group in zip(scalars, groups, strict=True)]  # fmt: skip
        self.base.load_state_dict({"state": restored, "param_groups": groups})

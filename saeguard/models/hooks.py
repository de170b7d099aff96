"""Uniform hook-point names across model families, and capture with an early stop.

Hook points are named ``resid_pre.L`` (input of block L), ``resid_post.L`` (output of block L),
``attn_out.L`` and ``mlp_out.L`` (what the attention and MLP sub-blocks add to the residual
stream; for Gemma that is after its post-attention / post-feed-forward norms).

``resid_post.L`` equals Hugging Face's ``output_hidden_states[L + 1]`` for every block but the
last: HF applies the final norm to its last hidden state, while ``resid_post`` of the last block
is the raw residual stream, before that norm.

:func:`run_to_hooks` runs only as far as the deepest requested hook: once every requested hook
has fired it raises an internal exception that unwinds the forward pass, so the layers above it,
the final norm and the LM head are never computed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saeguard.errors import SaeguardError

log = logging.getLogger(__name__)

HOOK_KINDS = ("resid_pre", "attn_out", "mlp_out", "resid_post")
_HOOK_RE = re.compile(r"^(resid_pre|resid_post|mlp_out|attn_out)\.(\d+)$")


@dataclass(frozen=True)
class FamilyLayout:
    """Where a model family keeps its blocks and the sub-modules whose outputs we read."""

    layers: str
    """Dotted path from the base model to the ModuleList of blocks."""
    attn_out: str
    """Sub-module of a block whose output is the attention's contribution to the residual."""
    mlp_out: str
    """Sub-module of a block whose output is the MLP's contribution to the residual."""


FAMILIES: dict[str, FamilyLayout] = {
    "llama": FamilyLayout("layers", "self_attn", "mlp"),
    "mistral": FamilyLayout("layers", "self_attn", "mlp"),
    "qwen2": FamilyLayout("layers", "self_attn", "mlp"),
    "qwen3": FamilyLayout("layers", "self_attn", "mlp"),
    "phi3": FamilyLayout("layers", "self_attn", "mlp"),
    "gemma": FamilyLayout("layers", "self_attn", "mlp"),
    "gemma2": FamilyLayout("layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3": FamilyLayout("layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": FamilyLayout("layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "gpt2": FamilyLayout("h", "attn", "mlp"),
    "gpt_neox": FamilyLayout("layers", "attention", "mlp"),
}


@dataclass(frozen=True)
class HookPoint:
    """A parsed hook-point name."""

    kind: str
    layer: int

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def depth(self) -> tuple[int, int]:
        """Order of the point in the forward pass (layer, stage within the layer)."""
        return (self.layer, HOOK_KINDS.index(self.kind))


def parse_hook(name: str, n_layers: int, model_name: str = "the model") -> HookPoint:
    """Parse and validate a hook-point name; unknown names list the valid ones."""
    match = _HOOK_RE.match(name.strip())
    if match is None or int(match.group(2)) >= n_layers:
        raise UnknownHookError(name, n_layers, model_name)
    return HookPoint(match.group(1), int(match.group(2)))


def all_hook_names(n_layers: int) -> list[str]:
    """Every hook-point name of a model with ``n_layers`` blocks, in forward order."""
    return [f"{kind}.{layer}" for layer in range(n_layers) for kind in HOOK_KINDS]


class UnknownHookError(SaeguardError, KeyError):
    """A hook-point name that does not exist for this model."""

    def __init__(self, name: str, n_layers: int, model_name: str) -> None:
        super().__init__(
            f"unknown hook point {name!r} for {model_name}. Valid hook points: "
            f"{', '.join(k + '.L' for k in HOOK_KINDS)} for L in 0..{n_layers - 1} "
            f"(e.g. resid_post.{n_layers // 2}); `saeguard hooks MODEL` lists them with shapes."
        )

    def __str__(self) -> str:
        return str(self.args[0])


def unwrap_adapters(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (its LoRA layers stay in place), else itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model  # type: ignore[no-any-return]


def family_layout(model: nn.Module) -> FamilyLayout:
    """The layout of a Hugging Face model, from its ``model_type`` or by looking for the blocks."""
    model = unwrap_adapters(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    n_layers = getattr(config, "num_hidden_layers", None)
    base = getattr(model, "base_model", model)
    for path, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and path and len(module) == n_layers:
            block = module[0]
            names = dict(block.named_children())
            attn = next((n for n in ("self_attn", "attention", "attn") if n in names), None)
            mlp = next((n for n in ("mlp", "feed_forward", "ffn") if n in names), None)
            if attn and mlp:
                log.info("model type %r: blocks at %s, using %s / %s", model_type, path, attn, mlp)
                return FamilyLayout(path, attn, mlp)
    raise SaeguardError(
        f"saeguard does not know where the blocks of model type {model_type!r} are. "
        f"Supported families: {', '.join(sorted(FAMILIES))}. Add a FamilyLayout for it in "
        "saeguard/models/hooks.py."
    )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks."""
    layout = family_layout(model)
    module: Any = getattr(unwrap_adapters(model), "base_model", model)
    for part in layout.layers.split("."):
        module = getattr(module, part)
    return module


class _StopForward(Exception):
    """Raised inside a hook to unwind the forward pass once every requested hook has fired."""


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SaeguardError(f"cannot read a tensor from a module output of type {type(output)}")


def _output_module(block: nn.Module, layout: FamilyLayout, point: HookPoint) -> nn.Module:
    """The module whose output is the activation of a post-hook point (not ``resid_pre``)."""
    if point.kind == "resid_post":
        return block
    name = layout.attn_out if point.kind == "attn_out" else layout.mlp_out
    module: nn.Module = getattr(block, name)
    return module


@contextmanager
def capture_hooks(
    model: nn.Module, points: Sequence[HookPoint], stop_early: bool = True, detach: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Register hooks that store each point's activation [batch, seq, d] in the yielded dict
    (``detach=False`` keeps the autograd graph, for losses on activations)."""
    layout = family_layout(model)
    blocks = decoder_blocks(model)
    store: dict[str, torch.Tensor] = {}
    remaining = {p.name for p in points}
    handles = []

    def record(name: str, tensor: torch.Tensor) -> None:
        store[name] = tensor.detach() if detach else tensor
        remaining.discard(name)
        if stop_early and not remaining:
            raise _StopForward

    for point in points:
        block = blocks[point.layer]
        if point.kind == "resid_pre":

            def pre_hook(_m: nn.Module, args: Any, kwargs: Any, _n: str = point.name) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                record(_n, hidden)

            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            continue
        module = _output_module(block, layout, point)

        def post_hook(_m: nn.Module, _inp: Any, output: Any, _n: str = point.name) -> None:
            record(_n, _first_tensor(output))

        handles.append(module.register_forward_hook(post_hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def run_to_hooks(
    model: nn.Module,
    input_ids: torch.Tensor,
    points: Sequence[HookPoint],
    detach: bool = True,
) -> dict[str, torch.Tensor]:
    """Run the base model (never the LM head) just far enough to read every point
    (``detach=False`` keeps the autograd graph, for losses on the activations)."""
    base = getattr(model, "base_model", model)
    with capture_hooks(model, points, True, detach) as store, suppress(_StopForward):
        base(input_ids=input_ids, use_cache=False)
    missing = [p.name for p in points if p.name not in store]
    if missing:
        raise SaeguardError(f"hook points {missing} did not fire during the forward pass")
    return dict(store)


@contextmanager
def splice_hook(
    model: nn.Module, point: HookPoint, replace: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace the activation [batch, seq, d] at ``point`` by ``replace(activation)`` for every
    forward pass run inside the block (used to splice SAE reconstructions into the model)."""
    layout = family_layout(model)
    block = decoder_blocks(model)[point.layer]

    def swap(output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return replace(output).to(output.dtype)
        first = _first_tensor(output)
        return (replace(first).to(first.dtype), *output[1:])

    if point.kind == "resid_pre":

        def pre_hook(_m: nn.Module, args: Any, kwargs: Any) -> Any:
            if args:
                return (swap(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": swap(kwargs["hidden_states"])}

        handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        module = _output_module(block, layout, point)
        handle = module.register_forward_hook(lambda _m, _i, output: swap(output))
    try:
        yield
    finally:
        handle.remove()

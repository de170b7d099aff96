"""Saving and loading SAEs: ``cfg.json`` + ``sae_weights.safetensors``, SAELens-compatible.

Tensors keep SAELens's names and shapes (``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in],
``b_enc``, ``b_dec``, ``threshold``), and ``cfg.json`` carries the keys SAELens reads
(``architecture``, ``d_in``, ``d_sae``, ``k``, ``hook_name``, ``apply_b_dec_to_input``,
``normalize_activations``, ``metadata``) beside a ``saeguard`` block with everything else (our
architecture config, masking, exclusions, the folded normalisation, training tokens, version).
We also read SAEs written by SAELens and by EleutherAI's sparsify (``cfg.json`` +
``sae.safetensors``). Nothing is ever pickled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saeguard import __version__
from saeguard.errors import ConfigError, CorruptFileError, SaeguardError
from saeguard.fileio import atomic_path, atomic_write_json, read_json
from saeguard.sae.base import SparseAutoencoder, saved_tensor
from saeguard.sae.config import SAEConfig
from saeguard.sae.hub import resolve_sae_dir
from saeguard.sae.registry import ARCHITECTURES, create_sae, sae_class, sae_config_from_dict

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"

STANDARD_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
"""The parameters every SAE has (saved under :meth:`SparseAutoencoder.file_name`)."""

_SAELENS_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|mlp_out|attn_out)$")


def to_saelens_hook(hook: str) -> str:
    """``resid_post.15`` -> ``blocks.15.hook_resid_post`` (TransformerLens naming)."""
    kind, _, layer = hook.partition(".")
    return f"blocks.{layer}.hook_{kind}" if layer.isdigit() else hook


def from_saelens_hook(name: str) -> str:
    """``blocks.15.hook_resid_post`` -> ``resid_post.15``; other names are kept."""
    match = _SAELENS_HOOK.match(name or "")
    return f"{match.group(2)}.{match.group(1)}" if match else name


_SPARSIFY_HOOK = re.compile(
    r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$"
)
_SPARSIFY_KINDS = {None: "resid_post", "mlp": "mlp_out", "self_attn": "attn_out",
                   "attn": "attn_out", "attention": "attn_out"}  # fmt: skip


def from_sparsify_hookpoint(name: str) -> str:
    """sparsify's hookpoint (the module path its folder is named after) in saeguard's names:
    ``layers.5`` -> ``resid_post.5`` (a block's output), ``layers.5.mlp`` -> ``mlp_out.5``,
    ``layers.5.self_attn`` -> ``attn_out.5``; other names are kept."""
    match = _SPARSIFY_HOOK.match(name or "")
    return f"{_SPARSIFY_KINDS[match.group(2)]}.{match.group(1)}" if match else name


def from_saelens_architecture(name: str) -> str:
    """Our architecture for a SAELens ``architecture``: the registered one SAELens runs under that
    name, preferring the one of that very name, then the most general class (``standard`` ->
    relu; ``jumprelu`` -> jumprelu, not batchtopk); other names are kept."""
    candidates = [a for a, cls in ARCHITECTURES.items() if cls.saelens_architecture() == name]
    if not candidates:
        return name
    return min(candidates, key=lambda a: (a != name, len(ARCHITECTURES[a].__mro__), a))


def save_sae(sae: SparseAutoencoder, directory: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` atomically (weights first)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        **{sae.file_name(name): getattr(sae, name).detach() for name in STANDARD_TENSORS},
        **sae.extra_tensors(),
    }
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    cfg = sae.cfg
    hook = str(metadata.get("hook", ""))
    layer = hook.partition(".")[2]
    saelens_meta = {
        "model_name": metadata.get("model", ""),
        "hook_name": to_saelens_hook(hook),
        "hook_layer": int(layer) if layer.isdigit() else None,
        "context_size": metadata.get("ctx_len"),
        "prepend_bos": metadata.get("prepend_bos", True),
        "dataset_path": metadata.get("corpus", ""),
    }
    activation_fn, activation_kwargs = sae.saelens_activation()
    document = {
        "architecture": sae.saelens_architecture(),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "k": cfg.k,
        "activation_fn_str": activation_fn,
        "activation_fn_kwargs": activation_kwargs,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # any input scale is folded into the weights
        **saelens_meta,
        "metadata": saelens_meta,
        "saeguard": {
            "version": __version__,
            "sae_config": cfg.to_dict(),
            **metadata,
        },
    }
    atomic_write_json(directory / CFG_FILE, document)
    return directory


def load_sae(directory: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Load a saeguard, SAELens or sparsify SAE directory, or a Hub SAE (``hf:ORG/REPO[:PATH]``,
    see :mod:`saeguard.sae.hub`); returns (sae, metadata)."""
    directory = resolve_sae_dir(directory)
    cfg_path = directory / CFG_FILE
    if not cfg_path.is_file():
        raise SaeguardError(
            f"{directory} holds no {CFG_FILE}: not an SAE directory (saeguard, SAELens or sparsify)"
        )
    document = read_json(cfg_path, f"SAE {CFG_FILE}", "", kind=dict)
    try:
        if (directory / WEIGHTS_FILE).is_file():
            tensors = _load_tensors(directory / WEIGHTS_FILE)
            if "saeguard" in document:
                return _load_saeguard(document, tensors)
            return _load_saelens(document, tensors)
        if (directory / SPARSIFY_WEIGHTS).is_file():
            sae, metadata = _load_sparsify(document, _load_tensors(directory / SPARSIFY_WEIGHTS))
            # sparsify names each SAE's folder after its hookpoint.
            return sae, {**metadata, "hook": from_sparsify_hookpoint(directory.name)}
    except ConfigError as exc:  # a setting out of its range: the file was edited or is foreign
        raise CorruptFileError(f"{cfg_path}: {exc}; re-save or re-train the SAE") from exc
    except SaeguardError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        # A field missing or of the wrong type, or an extra tensor of the wrong shape: the typed
        # readers below index the document directly; whatever they trip on, the file is wrong.
        raise CorruptFileError(
            f"{cfg_path} does not describe an SAE that saeguard can read "
            f"({type(exc).__name__}: {' '.join(str(exc).split())}); re-save or re-train it"
        ) from exc
    raise SaeguardError(
        f"{directory} has {CFG_FILE} but neither {WEIGHTS_FILE} (SAELens/saeguard) nor "
        f"{SPARSIFY_WEIGHTS} (sparsify)"
    )


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({exc}); re-save or re-train the SAE"
        ) from exc


def _config_from(values: dict[str, Any]) -> SAEConfig:
    return sae_config_from_dict(values)


def _fill(cfg: SAEConfig, tensors: dict[str, torch.Tensor]) -> SparseAutoencoder:
    """The SAE of ``cfg`` holding ``tensors``, whose names, shapes and values are checked before
    anything is allocated (a cfg.json claiming a huge width cannot exhaust memory)."""
    cls = sae_class(cfg.architecture)
    shapes = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    standard = {name: saved_tensor(tensors, cls.file_name(name), shape)
                for name, shape in shapes.items()}  # fmt: skip
    sae = create_sae(cfg)
    with torch.no_grad():
        for name, tensor in standard.items():
            getattr(sae, name).copy_(tensor.float())
    files = {cls.file_name(name) for name in shapes}
    sae.load_extra_tensors({k: v.float() for k, v in tensors.items() if k not in files})
    sae.eval()
    return sae


def _load_saeguard(
    document: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[SparseAutoencoder, dict[str, Any]]:
    block = dict(document["saeguard"])
    sae = _fill(_config_from(block.pop("sae_config")), tensors)
    return sae, block


def _load_saelens(
    document: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[SparseAutoencoder, dict[str, Any]]:
    arch = from_saelens_architecture(document["architecture"])
    k = document.get("k") or (document.get("activation_fn_kwargs") or {}).get("k") or 1
    if arch == "relu" and document.get("activation_fn_str") == "topk":
        arch = "topk"  # SAELens before v5 saved TopK SAEs as "standard" + activation_fn_str
    elif arch == "relu" and document.get("activation_fn_str") not in (None, "relu"):
        raise SaeguardError(
            f"SAELens activation {document['activation_fn_str']!r} is not supported "
            "(supported: relu, topk, jumprelu)"
        )
    if document.get("normalize_activations", "none") not in ("none", None):
        raise SaeguardError(
            f"this SAELens SAE normalises its inputs ({document['normalize_activations']!r}) "
            "with a scale saeguard cannot recover from cfg.json; fold it into the weights first"
        )
    cfg = _config_from(
        {"architecture": arch, "d_in": document["d_in"], "d_sae": document["d_sae"], "k": int(k)}
    )
    sae = _fill(cfg, tensors)
    if not document.get("apply_b_dec_to_input", True):
        sae.centre_encoder_input_()  # its encoder read raw x; ours reads x - b_dec
    meta = document.get("metadata") or document
    metadata = {
        "format": "saelens",
        "model": meta.get("model_name", ""),
        "hook": from_saelens_hook(meta.get("hook_name", "")),
    }
    return sae, metadata


def _load_sparsify(
    document: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[SparseAutoencoder, dict[str, Any]]:
    if "W_skip" in tensors or document.get("skip_connection") or document.get("transcode"):
        raise SaeguardError(
            "sparsify transcoders and SAEs with a skip connection are not supported"
        )
    if document.get("activation", "topk") != "topk":
        raise SaeguardError(
            f"sparsify activation {document['activation']!r} is not supported (only topk)"
        )
    encoder = tensors["encoder.weight"]  # [num_latents, d_in]
    d_sae, d_in = encoder.shape
    cfg = _config_from(
        {"architecture": "topk", "d_in": int(d_in), "d_sae": int(d_sae), "k": int(document["k"])}
    )
    mapped = {
        "W_enc": encoder.t().contiguous(),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    return _fill(cfg, mapped), {"format": "sparsify"}

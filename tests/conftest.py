"""Shared fixtures: tiny random models built in the test session, and small text corpora."""

from __future__ import annotations

import os
import random
from pathlib import Path

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

WORDS = [
    "the",
    "cat",
    "dog",
    "river",
    "mountain",
    "city",
    "history",
    "science",
    "music",
    "art",
    "king",
    "queen",
    "war",
    "peace",
    "river",
    "north",
    "south",
    "east",
    "west",
    "light",
    "dark",
    "stone",
    "water",
    "fire",
    "air",
    "number",
    "theory",
    "language",
    "people",
]

# Extra single-token words so the first-letter (absorption) task has words for most letters.
SPELLING_WORDS = (
    "apple arrow bread brick candle cloud drum dust eagle engine feather forest garden glass "
    "hammer horse island iron jacket jelly kettle kite ladder lemon marble mirror needle nest "
    "ocean orange pencil pillow quilt quiet rabbit rocket saddle silver table tiger umbrella "
    "uncle velvet violin wagon window yellow yard zebra zone"
).split()


def make_text_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """A blank-line separated text file of pseudo-sentences."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 60))]
        docs.append(f"Document {i}: " + " ".join(words) + ".")
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


def make_tokenizer(directory: Path):
    """A byte-level BPE tokenizer trained on the test vocabulary, with BOS/EOS/sep specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<s>", "</s>", "<pad>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(WORDS + SPELLING_WORDS)] * 20 + [f"Document {i}:" for i in range(100)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=["<|endoftext|>", "<mask>"],
    )
    fast.save_pretrained(directory)
    return fast


def build_tiny_model(family: str, vocab_size: int, seed: int = 0):
    """A randomly initialised 4-layer model of the given family (hidden size 32)."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
    )

    torch.manual_seed(seed)
    ids = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    shape = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
    }
    if family == "llama":
        config = LlamaConfig(num_key_value_heads=2, **shape, **ids)
    elif family == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=256, **ids)
    elif family == "gpt_neox":
        config = GPTNeoXConfig(**shape, **ids)
    elif family == "gemma3_text":
        config = Gemma3TextConfig(
            num_key_value_heads=2, head_dim=8, sliding_window=16, **shape, **ids
        )
    else:
        raise ValueError(family)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny models (with tokenizer) per family, loadable with saeguard's load_model."""
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for family in ("llama", "gpt2", "gpt_neox", "gemma3_text"):
        directory = root / family
        tokenizer = make_tokenizer(directory)
        model = build_tiny_model(family, vocab_size=len(tokenizer))
        model.save_pretrained(directory)
        dirs[family] = directory
    return dirs


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture()
def text_corpus(tmp_path: Path) -> Path:
    return make_text_corpus(tmp_path / "corpus.txt")


MONITOR_WORDS = (
    "the cat dog river mountain city history science music art king queen war peace".split()
)


def random_texts(n: int, seed: int) -> list[str]:
    """``n`` short texts of a fixed vocabulary (a tiny monitor's ID text)."""
    rng = random.Random(seed)
    words = MONITOR_WORDS
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) for _ in range(n)]


def fit_tiny_monitor(model_dir: Path, out: Path, fit_texts: int, calibration_texts: int) -> Path:
    """A random TopK SAE on the tiny llama's resid_post.2 and a monitor fitted and calibrated
    on random texts; returns the monitor directory."""
    from saeguard.ood import Monitor, MonitorConfig
    from saeguard.sae import SAEConfig, create_sae
    from saeguard.sae.io import save_sae

    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4))
    save_sae(sae, out / "sae", {"model": str(model_dir), "hook": "resid_post.2",
                                "corpus": "wiki-en", "ctx_len": 16})  # fmt: skip
    settings = MonitorConfig(fit_texts=fit_texts, calibration_texts=calibration_texts)
    monitor = Monitor.fit(out / "sae", settings, texts=random_texts(fit_texts, 0))
    monitor.calibrate(random_texts(calibration_texts, 1))
    monitor.save(out / "monitor")
    return out / "monitor"

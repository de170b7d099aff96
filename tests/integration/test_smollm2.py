"""Integration tests on the real embedded SmolLM2-135M and the real corpora (run in CI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saeguard.activations import ActivationCache
from saeguard.activations.source import ActivationHarvester, ActivationSourceConfig, prepare
from saeguard.data import CORPORA, load_corpus, select_split
from saeguard.jobs.harvest import HarvestConfig, harvest
from saeguard.models import load_model

pytestmark = pytest.mark.integration

HOOK = "resid_post.15"


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_smollm2_shape_and_hooks(smollm2) -> None:
    assert smollm2.family == "llama" and smollm2.n_layers == 30 and smollm2.d_model == 576
    assert len(smollm2.hook_names()) == 120
    # The cache holds a plain float model: no GGUF quantizer rides along into later loads.
    assert getattr(smollm2.model, "hf_quantizer", None) is None
    assert getattr(smollm2.model.config, "quantization_config", None) is None
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = smollm2.model(ids).logits[0, -1]
    assert smollm2.tokenizer.decode(logits.argmax()).strip() == "Paris"  # weights are real


def test_harvest_is_exact_and_excludes_attention_sinks(smollm2, tmp_path: Path) -> None:
    cfg = HarvestConfig(hooks=[HOOK], tokens=12_000, shard_tokens=4096, out=str(tmp_path / "c"))
    cache = harvest(cfg, loaded=smollm2)
    acts, index = cache.load(HOOK)
    assert acts.shape == (12_000, 576)
    # Random positions equal the model's own output_hidden_states from a full forward.
    tokens = cache.tokens()
    pick = torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))[:48]
    contexts = (index[pick] // 128).unique()
    with torch.inference_mode():
        hidden = smollm2.model(input_ids=tokens[contexts], output_hidden_states=True).hidden_states
    row = {int(c): i for i, c in enumerate(contexts)}
    reference = torch.stack([hidden[16][row[int(i // 128)], int(i % 128)] for i in index[pick]])
    torch.testing.assert_close(acts[pick], reference, atol=1e-4, rtol=0)
    # With the default exclusions no cached norm exceeds 10x the median...
    norms = acts.norm(dim=-1)
    assert norms.max() <= 10 * norms.median()
    # ...while the raw stream does hold attention sinks far above that (so the rule matters).
    raw_first = hidden[16][:, 0].norm(dim=-1)
    assert raw_first.min() > 50 * norms.median()


def test_bfloat16_forward_is_close(smollm2) -> None:
    cfg = ActivationSourceConfig(hooks=[HOOK], calibration_contexts=2)
    prepared = prepare(cfg, smollm2)
    rules, contexts = prepared.rules, prepared.contexts()
    batch = torch.tensor([next(contexts) for _ in range(2)])
    rules.median_norms = {HOOK: 173.0}
    full = ActivationHarvester(smollm2, [HOOK], rules).forward(batch)[HOOK]
    bf16 = load_model("smollm2-135m", dtype="bfloat16")
    approx = ActivationHarvester(bf16, [HOOK], rules).forward(batch)[HOOK]
    keep = rules.keep_mask(batch, full, HOOK)
    cos = torch.nn.functional.cosine_similarity(full[keep], approx[keep], dim=-1)
    assert approx.dtype == torch.float32 and cos.mean() > 0.98


def _manifest_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    def command(out: Path) -> list[str]:
        return [
            sys.executable, "-m", "saeguard", "-q", "harvest", "--hook", HOOK,
            "--tokens", "9000", "--shard-tokens", "1024", "--out", str(out),
        ]  # fmt: skip

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _manifest_shards(killed) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "harvest finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _manifest_shards(killed)
    assert partial >= 2 and not ActivationCache.open(killed).complete
    subprocess.run(command(killed), check=True, stdout=subprocess.DEVNULL)
    subprocess.run(command(tmp_path / "ref"), check=True, stdout=subprocess.DEVNULL)

    def checksums(out: Path) -> dict[str, str]:
        return {e["file"]: e["sha256"] for e in ActivationCache.open(out).shards}

    assert ActivationCache.open(killed).complete
    assert checksums(killed) == checksums(tmp_path / "ref")
    assert len(checksums(killed)) > partial


def test_registered_corpora_load_with_labels() -> None:
    sizes = {name: len(load_corpus(name).documents) for name in CORPORA}
    assert sizes["wiki-en"] > 9000 and sizes["wiki-es"] > 5000 and sizes["wiki-fr"] > 9000
    assert sizes["bbc"] == 2225 and sizes["harmful-questions"] > 900
    assert sizes["jailbreaks-wild"] > 600 and sizes["dan-templates"] >= 10
    bbc_labels = {d.label for d in load_corpus("bbc").documents}
    assert bbc_labels == {"business", "entertainment", "politics", "sports", "tech"}
    en_topics = {d.label for d in load_corpus("wiki-en").documents} - {None}
    for lang in ("wiki-es", "wiki-fr"):
        topics = {d.label for d in load_corpus(lang).documents} - {None}
        assert topics <= en_topics and len(topics) >= 7  # one label vocabulary across languages
    docs = load_corpus("wiki-en").documents
    train = {d.text for d in select_split(docs, "train")}
    test = {d.text for d in select_split(docs, "test")}
    assert not train & test and len(test) > 800


def test_gemma3_embedded_model_hooks() -> None:
    gemma = load_model("gemma3-270m")
    assert gemma.n_layers == 18 and gemma.d_model == 640
    ids = gemma.tokenizer("The cat sat on the mat", return_tensors="pt")["input_ids"]
    from saeguard.models import run_to_hooks

    with torch.inference_mode():
        got = run_to_hooks(gemma.model, ids, [gemma.hook_point("resid_post.8")])["resid_post.8"]
        hidden = gemma.model(ids, output_hidden_states=True).hidden_states[9]
    torch.testing.assert_close(got, hidden)

"""`saeguard browse` (issue 18): the collected numbers against independent computations, a
planted latent, the logit effects and neighbours, and a site that is static, offline and escapes
every text."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from saeguard.data.splits import split_of
from saeguard.sae import SAEConfig, create_sae
from saeguard.sae.io import load_sae, save_sae
from tests.conftest import WORDS, random_texts

HOOK = "resid_post.2"
PLANTED = 7
"""The latent planted to fire exactly on TARGET."""
TWIN, ORIGINAL = 11, 12
"""TWIN's decoder row is a copy of ORIGINAL's."""
TARGET = " river"
HOSTILE = ("<script>alert(1)</script>", "<img src=x onerror=alert(1)>")


def _corpus(path: Path) -> Path:
    """Word salad, plus texts carrying markup that must never reach a page unescaped (kept only
    when they fall in the test split, which `browse` reads)."""
    rng = random.Random(0)
    docs = []
    for i in range(240):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 50))]
        docs.append(f"Document {i}: " + " ".join(words) + ".")
    hostile = []
    for i in range(200):
        text = f"Note {i}: the river {HOSTILE[i % 2]} and the dark {HOSTILE[(i + 1) % 2]} city."
        if split_of(text) == "test":
            hostile.append(text)
    assert len(hostile) >= 4
    path.write_text("\n\n".join(docs + hostile[:6]), encoding="utf-8")
    return path


def _read_all(sae_dir: Path, corpus: Path) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(subject, activations, token ids) of every kept position of the corpus's test split,
    read as `browse` reads it (4 windows per text at most)."""
    from saeguard.activations.reader import ActivationReader, ReadFailure
    from saeguard.activations.subject import load_subject

    subject = load_subject(sae_dir, corpus=str(corpus), split="test")
    reader = ActivationReader(subject.loaded, subject.hook, subject.source.rules, subject.ctx_len)
    acts, tokens = [], []
    for _, item in reader.read([d.text for d in subject.source.documents], max_windows=4):
        if not isinstance(item, ReadFailure):
            acts.append(item.acts)
            tokens.append(item.tokens)
    return subject, torch.cat(acts), torch.cat(tokens)


@pytest.fixture(scope="module")
def planted(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random TopK SAE on the tiny llama with latent PLANTED firing exactly on TARGET (a
    mean-difference direction, its threshold between the classes) and TWIN a copy of ORIGINAL."""
    root = tmp_path_factory.mktemp("browse")
    corpus = _corpus(root / "corpus.txt")
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4))
    meta = {"model": str(tiny_llama_dir), "hook": HOOK, "corpus": str(corpus), "ctx_len": 32}
    sae_dir = root / "sae"
    save_sae(sae, sae_dir, meta)
    subject, x, tokens = _read_all(sae_dir, corpus)
    (target,) = subject.loaded.tokenizer(TARGET, add_special_tokens=False)["input_ids"]
    hit = tokens == target
    assert 5 < int(hit.sum()) < len(tokens) // 2
    direction = x[hit].mean(0) - x[~hit].mean(0)
    proj = x @ direction
    low, high = float(proj[hit].min()), float(proj[~hit].max())
    assert low > high, "the target token is not linearly separable at this hook"
    scale = 50.0 / (low - high)
    with torch.no_grad():
        sae.W_enc[:, PLANTED] = direction * scale
        sae.b_enc[PLANTED] = -(low + high) / 2 * scale
        sae.W_dec[TWIN] = sae.W_dec[ORIGINAL]
    save_sae(sae, sae_dir, meta)
    with torch.no_grad():
        dense = sae.encode(x)
    return {"root": root, "corpus": corpus, "sae_dir": sae_dir, "dense": dense, "hit": hit,
            "target": target, "n": len(x)}  # fmt: skip


@pytest.fixture(scope="module")
def site(planted: dict[str, Any]) -> dict[str, Any]:
    """The site of the planted SAE over the whole test split, built through the CLI."""
    from saeguard.cli import main

    out = planted["root"] / "site"
    rc = main(["browse", str(planted["sae_dir"]), "--out", str(out), "--corpus",
               str(planted["corpus"]), "--tokens", "1000000", "--device", "cpu",
               "--top-k", "5", "--neuronpedia"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "browse.json").read_text())
    return {"out": out, "summary": summary, "latents": _latents(out), "index": _data(out)}


def _js_payload(text: str) -> Any:
    """The JSON inside a data file (``window.X = {...};`` or ``saeguardShard(N, [...]);``)."""
    match = re.fullmatch(r"(?:window\.\w+ = |saeguardShard\(\d+, )(.*?)\)?;\n", text, re.S)
    assert match is not None, text[:80]
    return json.loads(match.group(1))


def _data(out: Path) -> dict[str, Any]:
    return dict(_js_payload((out / "data" / "index.js").read_text()))


def _latents(out: Path) -> list[dict[str, Any]]:
    latents: list[dict[str, Any]] = []
    for shard in sorted((out / "data").glob("latents_*.js")):
        latents += _js_payload(shard.read_text())
    return latents


def test_rates_counts_and_histograms_match_an_independent_dense_count(
    planted: dict[str, Any], site: dict[str, Any]
) -> None:
    latents, summary = site["latents"], site["summary"]
    assert summary["tokens_read"] == planted["n"] and len(latents) == 64
    counts = (planted["dense"] != 0).sum(0).tolist()
    maxima = planted["dense"].abs().max(0).values.tolist()
    assert [x["count"] for x in latents] == counts
    for latent, count, top in zip(latents, counts, maxima, strict=True):
        assert latent["rate"] == pytest.approx(count / planted["n"], rel=1e-3)
        assert sum(latent["hist"]["counts"]) == count  # every firing in one bin
        assert latent["max"] == pytest.approx(top, rel=1e-3)
        assert latent["dead"] == (count == 0)
    assert summary["dead"] == sum(c == 0 for c in counts)
    assert [row[0] for row in site["index"]["rows"]] == counts


def test_a_planted_latent_shows_its_token_at_the_centre_of_its_top_contexts(
    planted: dict[str, Any], site: dict[str, Any]
) -> None:
    latent = site["latents"][PLANTED]
    assert latent["count"] == int(planted["hit"].sum())  # fires exactly on the target
    assert len(latent["top"]) == 5
    values = [c["value"] for c in latent["top"]]
    assert values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(float(planted["dense"][:, PLANTED].max()), rel=1e-3)
    for context in latent["top"]:
        assert context["tokens"][context["at"]] == TARGET
        acts = dict(zip(context["acts"][::2], context["acts"][1::2], strict=True))
        assert acts[context["at"]] == context["value"]  # the snippet's own value at its centre
        assert all(context["tokens"][o] == TARGET for o in acts)  # and nowhere else
    assert latent["peak_tokens"] == [TARGET]
    # Quantile bands cover every firing; their samples are ordered like the bands.
    assert sum(b["count"] for b in latent["bands"]) == latent["count"]
    band_values = [[s["value"] for s in b["samples"]] for b in latent["bands"]]
    assert all(s["tokens"][s["at"]] == TARGET for b in latent["bands"] for s in b["samples"])
    assert min(band_values[0]) >= max(band_values[-1])
    # The 'text -> latents' page lists it wherever the target token is.
    texts = _js_payload((site["out"] / "data" / "texts.js").read_text())
    for text in texts:
        for token, found in zip(text["tokens"], text["latents"], strict=True):
            if found is not None and token == TARGET:
                assert PLANTED in found[::2]


def test_logit_effects_equal_a_direct_computation_through_the_final_norm(
    tiny_llama_dir: Path, planted: dict[str, Any], site: dict[str, Any]
) -> None:
    from saeguard.browse import logit_effects
    from saeguard.models import load_model

    loaded = load_model(str(tiny_llama_dir))
    sae, _ = load_sae(planted["sae_dir"])
    vocab = len(loaded.tokenizer)
    W_U = loaded.model.get_output_embeddings().weight[:vocab]
    i = 3
    torch.set_grad_enabled(False)
    # The site's table is the plain model's (RMSNorm weight 1 at initialisation).
    direct = sae.W_dec[i] @ W_U.T
    shown = site["latents"][i]["logits"]["pos"]
    assert [t for t, _ in shown] == [loaded.tokenizer.decode([int(j)])
                                     for j in direct.topk(10).indices]  # fmt: skip
    assert shown[0][1] == pytest.approx(float(direct.max()), rel=1e-3)
    # A non-trivial gain is applied elementwise before the unembedding.
    with torch.no_grad():
        loaded.model.model.norm.weight.copy_(torch.rand(32) + 0.5)
    effects = logit_effects(sae.W_dec, loaded.model, vocab, top=5)
    direct = (sae.W_dec[i] * loaded.model.model.norm.weight) @ W_U.T
    assert effects.pos_ids[i].tolist() == direct.topk(5).indices.tolist()
    assert torch.allclose(effects.pos_values[i], direct.topk(5).values, rtol=1e-4)
    assert effects.neg_ids[i].tolist() == (-direct).topk(5).indices.tolist()
    assert torch.allclose(effects.neg_values[i], -(-direct).topk(5).values, rtol=1e-4)
    assert "RMSNorm" in effects.how
    torch.set_grad_enabled(True)


def test_the_nearest_latent_of_a_duplicated_decoder_row_is_its_twin(site: dict[str, Any]) -> None:
    for a, b in ((TWIN, ORIGINAL), (ORIGINAL, TWIN)):
        nearest, cosine = site["latents"][a]["neighbours"][0]
        assert nearest == b and cosine == pytest.approx(1.0, abs=1e-4)
    assert all(len(x["neighbours"]) == 5 for x in site["latents"])


def test_the_site_is_static_offline_small_and_escapes_every_text(site: dict[str, Any]) -> None:
    out = site["out"]
    for name in ("index.html", "latent.html", "texts.html", "assets/common.js", "data/index.js",
                 "data/texts.js", "data/latents_000.js", "browse.json",
                 "neuronpedia/batch-0.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "index.html").stat().st_size + (out / "data/index.js").stat().st_size < 1e6
    texts = _js_payload((out / "data" / "texts.js").read_text())
    shown = ["".join(t["tokens"]) for t in texts]
    assert any(HOSTILE[0] in s for s in shown) and any(HOSTILE[1] in s for s in shown)
    remote = re.compile(r"(src|href|action)\s*=\s*[\"']?\s*(https?:)?//"
                        r"|url\(\s*[\"']?\s*(https?:)?//|@import|fetch\(|XMLHttpRequest"
                        r"|innerHTML|outerHTML|insertAdjacentHTML|document\.write",
                        re.I)  # fmt: skip
    files = [p for p in out.rglob("*") if p.is_file()]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not remote.search(text), (path, remote.search(text))
        assert "http://" not in text and "https://" not in text, path
        assert "<script>alert" not in text and "<img src=x" not in text, path
        if path.parent.name in ("data", "neuronpedia") or path.suffix == ".json":
            # data: no markup character at all, so no </script> or <!-- can ever end a script
            assert not {"<", ">", "&", "\u2028", "\u2029"} & set(text), path
    # The hostile texts reach the data (escaped), so the test cannot pass vacuously.
    assert "\\u003c" in (out / "data" / "texts.js").read_text()
    # Every page loads its data with <script src> from disk; links to a latent are simple.
    page = (out / "latent.html").read_text()
    assert '<script src="data/index.js">' in page and 'id="histogram"' in page
    assert "latent.html?i=" in (out / "assets" / "common.js").read_text()


def test_the_summary_and_neuronpedia_export(site: dict[str, Any]) -> None:
    summary = site["summary"]
    assert summary["format"] == "saeguard-browse" and summary["d_sae"] == 64
    assert summary["sae"]["hook"] == HOOK and summary["split"] == "test"
    assert summary["settings"]["top_k"] == 5 and summary["timings_s"]["wall"] > 0
    assert "RMSNorm" in summary["logit_effects"]
    batch = json.loads((site["out"] / "neuronpedia" / "batch-0.json").read_text())
    feature = batch["features"][PLANTED]
    assert feature["feature_index"] == PLANTED and batch["layer"] == 2
    assert feature["frac_nonzero"] == pytest.approx(site["latents"][PLANTED]["rate"], rel=1e-3)
    top = feature["activations"][0]
    assert len(top["tokens"]) == len(top["values"]) and max(top["values"]) > 0


def test_a_token_budget_stops_the_pass_and_a_rerun_replaces_only_its_own_files(
    planted: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from saeguard.cli import main

    out = tmp_path / "site"
    argv = ["browse", str(planted["sae_dir"]), "--out", str(out), "--corpus",
            str(planted["corpus"]), "--tokens", "150", "--device", "cpu",
            "--text-examples", "2", "--bins", "8"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "browse.json").read_text())
    assert summary["tokens_read"] == 150 == printed["tokens_read"]
    assert all(len(x["hist"]["counts"]) == 8 for x in _latents(out))
    assert len(_js_payload((out / "data" / "texts.js").read_text())) == 2
    assert main(argv) == 0  # the same folder again: replaced in place
    (out / "notes.txt").write_text("mine")
    assert main(argv) == 2  # a file saeguard did not write: refused, and kept
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"


def test_a_monitor_of_this_sae_adds_its_id_columns_and_another_is_refused(
    planted: dict[str, Any], tiny_llama_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from saeguard.browse import CollectConfig
    from saeguard.jobs.browse import BrowseConfig, run_browse
    from saeguard.ood import Monitor, MonitorConfig

    monitor = Monitor.fit(planted["sae_dir"], MonitorConfig(fit_texts=20, calibration_texts=20),
                          texts=random_texts(20, 0), progress=False)  # fmt: skip
    monitor.save(tmp_path / "monitor")
    cfg = BrowseConfig(sae_dir=str(planted["sae_dir"]), out=str(tmp_path / "site"),
                       corpus=str(planted["corpus"]), monitor=str(tmp_path / "monitor"),
                       device="cpu", collect=CollectConfig(tokens=300))  # fmt: skip
    summary = run_browse(cfg)
    assert summary["monitor"]["id_tokens"] == monitor.stats.n_tokens
    latents = _latents(tmp_path / "site")
    rate = monitor.stats.rate
    for i in (0, PLANTED):
        assert latents[i]["id"]["rate"] == pytest.approx(float(rate[i]))
        assert latents[i]["id"]["rare"] == (float(rate[i]) < monitor.cfg.tau_rate)
    index = _data(tmp_path / "site")
    assert index["columns"][-3:] == ["id_rate", "id_p999", "rare"]

    from saeguard.cli import main
    from tests.conftest import fit_tiny_monitor

    other = fit_tiny_monitor(tiny_llama_dir, tmp_path / "other", 20, 20)
    capsys.readouterr()
    rc = main(["browse", str(planted["sae_dir"]), "--out", str(tmp_path / "site2"),
               "--corpus", str(planted["corpus"]), "--monitor", str(other),
               "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "another SAE" in err[0]
    assert not (tmp_path / "site2").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens", "0"], "--tokens must be at least 1"),
        (["--top-k", "0"], "--top-k must be at least 1"),
        (["--left", "-1"], "--left must be 0 or more"),
        (["--dense-rate", "2"], "--dense-rate must lie in"),
        (["--dtype", "int8"], "invalid choice"),
    ],
)
def test_bad_options_are_one_line_errors(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from saeguard.cli import main

    with pytest.raises(SystemExit) if message == "invalid choice" else _nothing():
        rc = main(["browse", str(tmp_path / "sae"), "--out", str(tmp_path / "out"), *args])
        assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not (tmp_path / "out").exists()


def test_a_bad_sae_directory_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from saeguard.cli import main

    (tmp_path / "not_an_sae").mkdir()
    rc = main(["browse", str(tmp_path / "not_an_sae"), "--out", str(tmp_path / "out"),
               "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not an SAE directory" in err[0]
    assert not (tmp_path / "out").exists()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

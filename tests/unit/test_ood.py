"""OOD scores on hand-built cases, detection metrics, and the monitor on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from saeguard.errors import ConfigError, CorruptFileError
from saeguard.ood import Monitor, MonitorConfig
from saeguard.ood.analysis import analyse
from saeguard.ood.metrics import auroc, bootstrap_detection, fpr_at_tpr, rank_auroc, rank_fpr
from saeguard.ood.scores import energy, sparse_codes
from saeguard.ood.stats import QUANTILES, IDStats, StatsAccumulator, per_latent_quantiles
from saeguard.sae import SAEConfig, create_sae
from tests.conftest import fit_tiny_monitor
from tests.conftest import random_texts as _texts


def _identity_sae(d: int = 4, k: int = 1):
    """TopK SAE whose latent i is input coordinate i (W_enc = W_dec = I)."""
    sae = create_sae(SAEConfig(architecture="topk", d_in=d, d_sae=d, k=k))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _hand_stats(d: int = 4, never_seen: int = 3, p999: float = 1.0) -> IDStats:
    """ID statistics: latent ``never_seen`` never fired; the others fired on 10% of tokens with
    p99.9 = ``p999``."""
    count = torch.full((d,), 1000, dtype=torch.long)
    count[never_seen] = 0
    quantiles = torch.full((len(QUANTILES), d), p999)
    quantiles[:, never_seen] = 0
    return IDStats(
        n_tokens=10_000,
        n_texts=100,
        firing_count=count,
        quantiles=quantiles,
        l0_mean=1.0,
        l0_std=0.5,
        recon_mean=0.1,
        recon_quantiles=[0.05, 0.1, 0.2],
        pooled_mean=torch.zeros(d),
        pooled_precision=torch.eye(d),
        knn_bank=torch.eye(d),
        top_values=torch.zeros(1, d),
        top_window=torch.zeros(1, d, dtype=torch.int32),
        top_position=torch.zeros(1, d, dtype=torch.int32),
        context_tokens=torch.zeros(1, 2, dtype=torch.int32),
    )


def _scores(tokens: list[list[float]], stats: IDStats | None = None, margin: float = 0.1):
    x = torch.tensor(tokens)
    [result] = analyse(_identity_sae(), [x], stats or _hand_stats(), 1e-4, margin, 1, {})
    return result


def test_a_latent_never_seen_in_id_counts_as_fallacious_and_one_in_range_does_not() -> None:
    unseen = _scores([[0.0, 0.0, 0.0, 0.5]])
    assert unseen.scores["fallacious_count"] == 1.0
    assert unseen.scores["fallacious_mass"] == pytest.approx(1.0)
    assert bool(unseen.rare.any()) and not bool(unseen.out_of_range.any())
    in_range = _scores([[0.5, 0.0, 0.0, 0.0]])
    assert in_range.scores["fallacious_count"] == 0.0
    assert in_range.scores["fallacious_mass"] == 0.0


def test_out_of_range_needs_the_margin_above_p999() -> None:
    assert _scores([[1.05, 0, 0, 0]]).scores["fallacious_count"] == 0.0  # above p99.9, not margin
    far = _scores([[1.5, 0, 0, 0]])
    assert far.scores["fallacious_count"] == 1.0
    assert bool(far.out_of_range.any()) and not bool(far.rare.any())


def test_count_is_a_per_token_mean_and_mass_a_share_of_activation() -> None:
    # Token 1: unseen latent 3 (value 1); token 2: ordinary latent 0 (value 3 > p99.9 x 1.1? no:
    # p99.9 is 5 here, so in range). One of two tokens is fallacious; mass 1 / (1 + 3).
    result = _scores([[0, 0, 0, 1.0], [3.0, 0, 0, 0]], _hand_stats(p999=5.0))
    assert result.scores["fallacious_count"] == pytest.approx(0.5)
    assert result.scores["fallacious_mass"] == pytest.approx(0.25)


def test_recon_error_l0_shift_and_energy_by_hand() -> None:
    exact = _scores([[0.5, 0, 0, 0]])  # k=1 reconstructs a one-hot input exactly
    assert exact.scores["recon_error"] == pytest.approx(0.0, abs=1e-9)
    lossy = _scores([[0.5, 0.5, 0, 0]])  # keeps one of two equal coordinates: error 1/2
    assert lossy.scores["recon_error"] == pytest.approx(0.5 / 0.1)  # relative to the ID mean 0.1
    # TopK L0 is read before the cut: two positive pre-activations, ID mean 1, std 0.5 -> 2.
    assert lossy.scores["l0_shift"] == pytest.approx(2.0)
    assert energy({"a": 3.0, "b": 1.0}, {"a": (1.0, 2.0), "b": (1.0, 0.0)}) == pytest.approx(1.0)


def test_mahalanobis_and_knn_grow_with_distance_from_id() -> None:
    near = _scores([[1.0, 0, 0, 0]]).scores
    far = _scores([[1.0, 1.0, 1.0, 0]]).scores
    assert near["mahalanobis"] == pytest.approx(1.0)
    assert far["mahalanobis"] > near["mahalanobis"]
    assert near["knn"] == pytest.approx(0.0, abs=1e-6)  # the bank holds this direction
    assert far["knn"] > 0.5


def test_sparse_codes_match_the_dense_encoder() -> None:
    torch.manual_seed(0)
    for arch in ("topk", "relu", "jumprelu"):
        sae = create_sae(SAEConfig(architecture=arch, d_in=8, d_sae=32, k=4))
        x = torch.randn(50, 8)
        codes = sparse_codes(sae, x)
        dense = torch.zeros(50, 32).scatter_(-1, codes.indices, codes.values)
        assert torch.allclose(dense, sae.encode(x), atol=1e-6), arch


def test_per_latent_quantiles_match_numpy() -> None:
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 5, (2000,), generator=gen)
    val = torch.rand(2000, generator=gen)
    out = per_latent_quantiles(idx, val, 6, (0.5, 0.99))
    for latent in range(5):
        expected = np.quantile(val[idx == latent].numpy(), [0.5, 0.99], method="lower")
        assert np.allclose(out[:, latent].numpy(), expected)
    assert out[:, 5].tolist() == [0.0, 0.0]  # never active


def test_accumulator_keeps_each_latents_top_contexts() -> None:
    acc = StatsAccumulator(d_sae=4, top_k=2)
    first = acc.add_windows([[0, 1, 2, 3]])
    sae = _identity_sae()
    x = torch.tensor([[0.1, 0, 0, 0], [0.9, 0, 0, 0], [0, 0.4, 0, 0], [0.5, 0, 0, 0]])
    codes = sparse_codes(sae, x)
    window = torch.full((4,), first)
    position = torch.arange(4)
    acc.add(codes, torch.zeros(4), window, position, x.mean(0, keepdim=True))
    acc.add(codes, torch.zeros(4), window, position, x.mean(0, keepdim=True) + 1)
    stats = acc.finish(ctx_len=4)
    assert stats.top_values[:, 0].tolist() == pytest.approx([0.9, 0.9])
    assert stats.top_position[:, 0].tolist() == [1, 1]
    assert stats.top_values[0, 1].item() == pytest.approx(0.4)
    assert int(stats.firing_count[0]) == 6 and int(stats.firing_count[3]) == 0


def test_detection_metrics_agree_with_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 300), rng.normal(1, 1, 200)
    labels = np.r_[np.zeros(300), np.ones(200)]
    assert auroc(neg, pos) == pytest.approx(roc_auc_score(labels, np.r_[neg, pos]))
    assert rank_auroc(neg[None], pos[None])[0] == pytest.approx(auroc(neg, pos))
    assert rank_fpr(neg[None], pos[None], 0.95)[0] == pytest.approx(fpr_at_tpr(neg, pos))
    result = bootstrap_detection(neg, pos, resamples=200)
    low, high = result["auroc_ci95"]  # type: ignore[misc]
    assert low < result["auroc"] < high
    perfect = bootstrap_detection(np.zeros(20), np.ones(20), resamples=100)
    assert perfect["auroc"] == 1.0 and perfect["fpr95"] == 0.0


@pytest.fixture(scope="module")
def tiny_monitor(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_tiny_monitor(tiny_llama_dir, tmp_path_factory.mktemp("ood"), 100, 60)


def test_monitor_scores_flags_explains_and_round_trips(tiny_monitor: Path) -> None:
    monitor = Monitor.load(tiny_monitor)
    assert monitor.stats.n_tokens > 500 and set(monitor.thresholds) >= {"energy", "mahalanobis"}
    odd = "zebra quilt xylophone umbrella velvet kettle " * 3
    results = monitor.score(_texts(5, 2) + [odd], explain_all=True)
    assert all(r.error is None and r.flagged is not None for r in results)
    explained = [r for r in results if r.explanation]
    assert explained, "some text has a fallacious latent on a random SAE"
    latent = explained[0].explanation[0]
    assert latent.input_contexts and latent.reason in (
        "rare",
        "out of range",
        "rare and out of range",
    )
    if latent.id_firings:  # a latent seen in ID shows its top ID contexts
        assert latent.id_contexts and latent.id_contexts[0]["value"] > 0
    again = Monitor.load(tiny_monitor).score(_texts(5, 2))
    for a, b in zip(results, again, strict=False):
        for name, value in a.scores.items():
            assert b.scores[name] == pytest.approx(value, rel=1e-4, abs=1e-6)


def test_calibrated_threshold_keeps_the_false_positive_rate_on_calibration_text(
    tiny_monitor: Path,
) -> None:
    monitor = Monitor.load(tiny_monitor)
    results = monitor.score(_texts(60, 1), explain=False)
    flagged = np.mean([r.flagged for r in results])
    assert flagged <= monitor.calibration["target_fpr"] + 1e-9


def test_edge_cases_empty_non_utf8_and_long_text(tiny_monitor: Path) -> None:
    monitor = Monitor.load(tiny_monitor)
    long_text = " ".join(["the river city"] * 120)
    empty, spaces, bad, long = monitor.score(["", "   ", b"caf\xe9 the dog", long_text])
    [capped] = monitor.score([long_text], max_windows=2)
    assert empty.error and "empty" in empty.error and not empty.scores and empty.flagged is None
    assert spaces.error
    assert bad.error is None and bad.scores and any("UTF-8" in w for w in bad.warnings)
    assert long.n_windows > 2 and not long.truncated
    assert capped.n_windows == 2 and capped.truncated and capped.warnings


def test_monitor_refuses_another_model_and_names_corrupt_files(
    tiny_monitor: Path, tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="fitted for"):
        Monitor.load(tiny_monitor, model=str(tiny_model_dirs["gpt_neox"]))
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_monitor, broken)
    (broken / "id_stats.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptFileError, match="id_stats"):
        Monitor.load(broken)
    (broken / "monitor.json").write_text("{", encoding="utf-8")
    with pytest.raises(CorruptFileError, match="monitor.json"):
        Monitor.load(broken)
    with pytest.raises(Exception, match="not a monitor"):
        Monitor.load(tmp_path)


def test_impossible_monitor_configs_fail_early() -> None:
    with pytest.raises(ConfigError, match="target-fpr"):
        MonitorConfig(target_fpr=0.7)
    with pytest.raises(ConfigError, match="flag-score"):
        MonitorConfig(flag_score="vibes")
    with pytest.raises(ConfigError, match="calibration-texts"):
        MonitorConfig(calibration_texts=3)


def test_ood_score_cli_reads_stdin_bytes_and_writes_json_lines(
    tiny_monitor: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io
    import sys

    from saeguard.cli import main

    data = b"the cat river\n\ncaf\xe9 water\n"
    monkeypatch.setattr(sys, "stdin", type("S", (), {"buffer": io.BytesIO(data)})())
    assert main(["-q", "ood", "score", "--monitor", str(tiny_monitor)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2  # the blank line is not a text
    assert lines[1]["warnings"] and lines[0]["scores"]["energy"] == pytest.approx(
        lines[0]["scores"]["energy"]
    )


def test_shift_sets_are_seeded_and_unknown_shifts_are_named() -> None:
    from saeguard.data.shifts import build_shift

    base = _texts(30, 3)
    typos = build_shift("typos:0.2", base, 10, seed=1)
    assert len(typos.ood_texts) == 10 and typos.ood_texts != base[:10]
    assert typos.ood_texts == build_shift("typos:0.2", base, 10, seed=1).ood_texts
    wrap = build_shift("jailbreak-wrap", base, 5)
    assert wrap.id_texts is not None and len(wrap.id_texts) == 5 and wrap.truncate == "tail"
    assert all(w.endswith(q) for w, q in zip(wrap.ood_texts, wrap.id_texts, strict=True))
    assert build_shift("code-python", base, 5).kind == "code"
    with pytest.raises(ConfigError, match="unknown shift"):
        build_shift("vibes", base, 5)
    with pytest.raises(ConfigError, match="rate"):
        build_shift("typos:lots", base, 5)


def test_reader_windows_cover_the_text_from_either_end(tiny_monitor: Path) -> None:
    reader = Monitor.load(tiny_monitor).reader
    ids = list(range(100, 140))  # 40 tokens, 15 per window (ctx_len 16 with a start token)
    head, cut = reader.windows(ids, "head")
    assert [len(w) - 1 for w in head] == [15, 15, 10] and not cut
    tail, _ = reader.windows(ids, "tail")
    assert [len(w) - 1 for w in tail] == [10, 15, 15] and tail[-1][-1] == 139
    last, cut = reader.windows(ids, "tail", max_windows=1)
    assert cut and last[0][1:] == ids[-15:]


def test_length_batches_keep_short_windows_out_of_full_forwards() -> None:
    from saeguard.activations.reader import MAX_ROWS_FACTOR, PAD_WASTE, length_batches

    # One length: batch_size per forward, as a plain cut would.
    assert length_batches([128] * 20, 8) == [list(range(8)), list(range(8, 16)), [16, 17, 18, 19]]
    # Eight texts of which four have a short last window: the short ones share one forward
    # instead of being padded into one with the full windows.
    lengths = [128] * 8 + [9, 14, 20, 25]
    batches = length_batches(lengths, 8)
    assert sorted(i for b in batches for i in b) == list(range(12))
    assert [sorted(lengths[i] for i in b) for b in batches] == [[9, 14, 20, 25], [128] * 8]
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = [int(n) for n in rng.integers(1, 129, rng.integers(1, 200))]
        batches = length_batches(lengths, 8)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            longest = max(lengths[i] for i in b)
            assert len(b) * longest <= 8 * max(lengths) and len(b) <= MAX_ROWS_FACTOR * 8
            padding = len(b) * longest - sum(lengths[i] for i in b)
            assert padding <= max(PAD_WASTE * len(b) * longest, max(lengths))


def test_run_end_to_end_on_a_tiny_model_resumes_without_redoing_work(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from saeguard.jobs.ood import OodBenchmarkConfig
    from saeguard.jobs.run import RunConfig, run
    from saeguard.ood import MonitorConfig

    cfg = RunConfig(
        out=str(tmp_path / "run"),
        model=str(tiny_llama_dir),
        hook="resid_post.2",
        quick=True,
        tokens=8192,
        monitor=MonitorConfig(fit_texts=40, calibration_texts=30),
        benchmark=OodBenchmarkConfig(
            id_texts=20, per_shift=12, shifts=["typos:0.2", "jailbreak-wrap", "wiki-es"]
        ),
    )
    state = run(cfg)
    out = tmp_path / "run"
    bench = json.loads((out / "ood" / "ood_benchmark.json").read_text())
    assert set(bench["shifts"]) == {"typos:0.2", "jailbreak-wrap", "wiki-es"}
    for row in bench["shifts"].values():
        assert {"energy", "fallacious_count", "mahalanobis", "knn", "msp", "perplexity"} <= set(
            row["scores"]
        )
    index = (out / "index.html").read_text()
    for link in ("ood/ood_report.html", "ood/examples.html", "sae/eval.html"):
        assert link in index and (out / link).is_file()
    assert state["steps"]["train"]["done"]
    weights = out / "sae" / "sae_weights.safetensors"
    stamps = {
        p: p.stat().st_mtime_ns for p in [weights, *sorted((out / "ood" / "scores").iterdir())]
    }
    (out / "ood" / "scores" / "wiki-es.json").unlink()  # an interrupted benchmark
    run(cfg)
    for path, stamp in stamps.items():
        if path.name != "wiki-es.json":
            assert path.stat().st_mtime_ns == stamp, f"{path.name} was recomputed"
    assert (out / "ood" / "scores" / "wiki-es.json").is_file()


@pytest.mark.parametrize(
    "field, value",
    [
        (("thresholds", "energy"), "abc"),
        (("config", "target_fpr"), "abc"),
        (("config", "target_fpr"), 0.9),  # the right type, but a config that cannot work
        (("reference", "recon_error"), [1.0]),
        (("exclusions", "surprise"), 1),
        (("ctx_len",), "128"),
        (("model",), None),
        (("stats", "n_tokens"), -5),
        ((), []),
    ],
)
def test_a_monitor_json_with_wrong_types_is_one_clear_line(
    tiny_monitor: Path, tmp_path: Path, field: tuple[str, ...], value: object
) -> None:
    """Issue 13, case 4: a threshold "abc" used to crash with a ValueError traceback."""
    import shutil

    broken = tmp_path / "m"
    shutil.copytree(tiny_monitor, broken)
    doc = json.loads((broken / "monitor.json").read_text())
    if not field:
        doc = value
    else:
        *parents, last = field
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value
    (broken / "monitor.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptFileError, match=r"monitor\.json") as info:
        Monitor.load(broken)
    assert "\n" not in str(info.value)
    (broken / "monitor.json").write_text((tiny_monitor / "monitor.json").read_text())
    (broken / "calibration_scores.json").write_text('{"energy": ["x"]}')
    with pytest.raises(CorruptFileError, match="calibration_scores"):
        Monitor.load(broken)

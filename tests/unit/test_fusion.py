"""The fused score, surprisal-weighted fallacious scores and per-token scores (SPEC section 5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saeguard.cli import main
from saeguard.errors import ConfigError
from saeguard.ood import Monitor, MonitorConfig
from saeguard.ood.analysis import analyse
from saeguard.ood.fusion import Fusion, ReferenceDistribution, combine
from saeguard.ood.metrics import detection_summary
from saeguard.ood.scores import FUSED, SparseCodes, fallacious_mask, surprisal_weights
from tests.conftest import fit_tiny_monitor
from tests.conftest import random_texts as _texts
from tests.unit.test_ood import _hand_stats, _identity_sae


# --- p-values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tail", ["none", "exponential"])
def test_pvalues_are_monotone_and_uniform_on_id_draws(tail: str) -> None:
    rng = np.random.default_rng(0)
    ref = ReferenceDistribution.fit(rng.gamma(2.0, 1.0, 400))
    grid = np.linspace(-1, 40, 2000)
    p = ref.pvalues(grid, tail)  # type: ignore[arg-type]
    assert np.all(np.diff(p) <= 0), "a higher score never gets a larger p-value"
    assert p.min() > 0 and p.max() <= 1
    if tail == "exponential":  # beyond every reference value the order is kept, not tied
        beyond = p[grid > ref.values[-1]]
        assert np.all(np.diff(beyond) < 0)
    # Calibrated: on fresh ID draws P(p <= a) ~ a. The conformal guarantee holds on average
    # over reference samples (one reference of 400 is off by ~0.01 at a = 0.05), so: 20
    # references of 400 values, 2,000 fresh draws each (sampling error ~0.003).
    for level in (0.01, 0.05, 0.1, 0.25, 0.5, 0.9):
        rates = []
        for _ in range(20):
            one = ReferenceDistribution.fit(rng.gamma(2.0, 1.0, 400))
            fresh = one.pvalues(rng.gamma(2.0, 1.0, 2000), tail)  # type: ignore[arg-type]
            rates.append(np.mean(fresh <= level))
        assert abs(np.mean(rates) - level) < 0.01, level


def test_a_constant_reference_has_no_tail_and_still_gives_valid_pvalues() -> None:
    ref = ReferenceDistribution.fit([2.0] * 50)
    assert ref.tail_scale == 0.0
    p = ref.pvalues(np.array([1.0, 2.0, 3.0]), "exponential")
    assert p[0] == 1.0 and p[1] == 1.0 and p[2] == pytest.approx(1 / 51)


# --- the fusion rules ------------------------------------------------------------------------
def test_fusion_rules_on_planted_score_vectors() -> None:
    rng = np.random.default_rng(1)
    names = [f"s{i}" for i in range(5)]
    reference = {n: rng.normal(size=500).tolist() for n in names}
    id_rows = [{n: float(v) for n, v in zip(names, rng.normal(size=5), strict=True)}
               for _ in range(2000)]  # fmt: skip
    one_extreme = {**{n: 0.0 for n in names}, "s2": 6.0}  # one component far out
    all_moderate = {n: 1.8 for n in names}  # every component a little high
    one_moderate = {**{n: 0.0 for n in names}, "s0": 1.8}
    fisher = Fusion.fit(reference, names, "fisher", "exponential")
    min_p = Fusion.fit(reference, names, "min_p", "exponential")
    f = fisher.score_many([one_extreme, all_moderate, one_moderate])
    m = min_p.score_many([one_extreme, all_moderate, one_moderate])
    assert f[1] > f[2] and m[0] > m[1]  # Fisher adds up evidence; min-p follows the extreme one
    assert all(v is not None for v in f + m)
    for fusion in (fisher, min_p):  # a threshold set on ID draws holds its rate on fresh ones
        values = np.array(fusion.score_many(id_rows), dtype=float)
        threshold = np.quantile(values[:1000], 0.95, method="higher")
        assert abs(np.mean(values[1000:] > threshold) - 0.05) < 0.03
    assert fisher.score_many([{"s0": 1.0}]) == [None]  # a text missing a component: no score


def test_combine_is_minus_log10_of_the_combined_pvalue() -> None:
    p = np.array([[0.5, 0.5], [0.01, 1.0]])
    from scipy.stats import chi2

    expected = -np.log10(chi2.sf(-2 * np.log(p).sum(axis=1), 4))
    assert np.allclose(combine(p, "fisher"), expected)
    sidak = 1 - (1 - p.min(axis=1)) ** 2
    assert np.allclose(combine(p, "min_p"), -np.log10(sidak))
    tiny = combine(np.array([[1e-300, 1e-300]]), "fisher")  # no overflow to inf
    assert np.isfinite(tiny).all() and tiny[0] > 500


# --- surprisal weighting ---------------------------------------------------------------------
def test_surprisal_weights_an_unseen_latent_over_a_rare_one_and_a_common_in_range_one_not() -> None:
    stats = _hand_stats(d=4, never_seen=3, p999=1.0)
    stats.firing_count[2] = 1  # rare: 1 of 10,000 tokens
    codes = SparseCodes(
        values=torch.tensor([[0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 0.0, 0.0]]),
        indices=torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]),
        l0=torch.tensor([4, 1]),
    )
    fall, _, _ = fallacious_mask(codes, stats.rate.float(), stats.p999, 1e-3, 0.1)
    w = surprisal_weights(codes, fall, stats.rate, stats.p999, stats.rate_floor)
    assert w[0, 0] == 0 and w[0, 1] == 0  # common, in range: contributes nothing
    assert w[0, 3] > w[0, 2] > 0  # never seen (rate floor) outweighs rare
    assert float(w[0, 3]) == pytest.approx(-np.log(0.5 / 10_000))
    assert float(w[0, 2]) == pytest.approx(-np.log(1 / 10_000))
    # A common latent twice above its p99.9: -log(0.1) x 2.
    assert float(w[1, 0]) == pytest.approx(-np.log(0.1) * 2.0)


def test_surprisal_scores_mean_and_top_share_and_token_scores_line_up() -> None:
    stats = _hand_stats(d=4, never_seen=3, p999=5.0)
    # Ten tokens of an in-range latent, one planted token (position 6) with the unseen latent.
    tokens = [[1.0, 0, 0, 0]] * 10
    tokens[6] = [0, 0, 0, 1.0]
    [result] = analyse(_identity_sae(), [torch.tensor(tokens)], stats, 1e-4, 0.1, 1, {}, 0.1)
    surprise = -np.log(0.5 / 10_000)
    assert result.scores["fallacious_surprisal"] == pytest.approx(surprise / 10)
    assert result.scores["fallacious_surprisal_top"] == pytest.approx(surprise)  # top 1 of 10
    for name, values in result.token_scores.items():
        assert len(values) == 10, name
    assert int(result.token_scores["fallacious_surprisal"].argmax()) == 6


# --- the monitor end to end on a tiny model --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_monitor(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_tiny_monitor(tiny_llama_dir, tmp_path_factory.mktemp("fusion"), 100, 60)


def test_the_default_monitor_flags_with_the_fused_score_fitted_on_held_out_id_text(
    tiny_monitor: Path,
) -> None:
    monitor = Monitor.load(tiny_monitor)
    assert monitor.cfg.flag_score == FUSED and monitor.fusion is not None
    assert set(monitor.fusion.components) >= {"recon_error", "mahalanobis", "perplexity"}
    # The reference is the 20 held-back fit texts (a fifth of 100), every single score of them.
    assert {len(v) for v in monitor.reference_scores.values()} == {20}
    assert FUSED in monitor.thresholds
    doc = json.loads((tiny_monitor / "monitor.json").read_text())
    assert doc["fusion"]["reference_texts"] == 20 and doc["score_versions"][FUSED] == 1
    results = monitor.score(_texts(8, 3) + ["zebra quilt xylophone " * 4], explain_all=True)
    for r in results:
        assert r.flagged is not None and FUSED in r.scores and "perplexity" in r.scores
        assert set(r.p_values) == set(monitor.fusion.components)
        assert all(0 < p <= 1 for p in r.p_values.values())


def test_per_token_scores_follow_the_tokens_and_find_a_planted_word(tiny_monitor: Path) -> None:
    monitor = Monitor.load(tiny_monitor)
    clean = "the cat river mountain city history music art king queen war peace the dog"
    planted = clean.replace("history", "zebra xylophone")
    [a, b] = monitor.score([clean, planted], tokens=True, explain_all=True)
    assert len(a.tokens) == a.n_tokens and len(b.tokens) == b.n_tokens
    decoded = "".join(t["token"] for t in b.tokens)
    assert decoded.strip() == planted  # the rows are the text's tokens, in order
    # The start token (position 0, nothing predicts it) is not scored; every scored token has
    # the LM's surprisal given the tokens before it.
    assert a.tokens[0]["position"] == 1
    assert all(t["lm_surprisal"] is not None for t in a.tokens)
    # Each token's LM surprisal is -log p of that token given the window before it.
    [(_, item)] = list(monitor.reader.read([planted], with_lm=True))
    assert len(item.windows) == 2  # type: ignore[union-attr]  # longer than one context
    for w, ids in enumerate(item.windows):  # type: ignore[union-attr]
        window = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(monitor.loaded.model(window).logits[0].float(), -1)
        rows = [row for row in b.tokens if row["window"] == w]
        assert rows
        for row in rows:
            pos = row["position"]
            expected = -float(logp[pos - 1, int(window[0, pos])])
            assert row["lm_surprisal"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    for latent in b.explanation:  # each latent says on which tokens it fired
        assert latent.token_positions and max(latent.token_positions) < b.n_tokens
        assert len(latent.id_range) == 3


def test_ood_score_cli_tokens_option(tiny_monitor: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["-q", "ood", "score", "--monitor", str(tiny_monitor), "--tokens",
               "the cat dog river"])  # fmt: skip
    assert rc == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert len(row["tokens"]) == row["n_tokens"] and "fused" in row["scores"]
    assert {"recon_error", "fallacious_surprisal", "lm_surprisal", "latents"} <= set(
        row["tokens"][1]
    )


def test_a_monitor_without_the_lm_in_its_fused_score_needs_no_lm(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    fitted = fit_tiny_monitor(tiny_llama_dir, tmp_path, 60, 30)
    monitor = Monitor.fit(
        fitted / "sae",
        MonitorConfig(fit_texts=60, calibration_texts=30, fused_with_lm=False),
        texts=_texts(60, 0),
        progress=False,
    )
    assert not monitor.needs_lm and "perplexity" not in monitor.fusion.components  # type: ignore[union-attr]
    [row] = monitor.score(["the cat dog"])
    assert FUSED in row.scores and "perplexity" not in row.scores


def test_fusion_settings_that_cannot_work_fail_early() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        MonitorConfig(fused_scores=["recon_error", "nonsense"])
    with pytest.raises(ConfigError, match="only LM baselines"):
        MonitorConfig(fused_scores=["perplexity"], fused_with_lm=False)
    with pytest.raises(ConfigError, match="top-q"):
        MonitorConfig(top_q=0)


def test_detection_summary_counts_wins_ties_and_losses() -> None:
    def cell(a: float, lo: float, hi: float) -> dict[str, object]:
        return {"auroc": a, "auroc_ci95": [lo, hi]}

    shifts = {
        "a": {"scores": {"fused": cell(0.9, 0.88, 0.92), "x": cell(0.7, 0.6, 0.8),
                         "b": cell(0.8, 0.75, 0.85)}},
        "b": {"scores": {"fused": cell(0.6, 0.5, 0.7), "x": cell(0.65, 0.6, 0.7),
                         "b": cell(0.95, 0.9, 0.99)}},
    }  # fmt: skip
    summary = detection_summary(shifts, "fused", ["x", "b"], ["b"])
    assert summary["vs_best_baseline"] == {"win": 1, "tie": 0, "loss": 1}
    assert summary["per_shift"]["a"]["within_margin_of_best_single"]
    assert not summary["per_shift"]["b"]["within_margin_of_best_single"]
    assert summary["mean_auroc"]["fused"] == pytest.approx(0.75)
    assert not summary["fused_has_best_mean"]  # b's mean is 0.875


def test_the_token_heat_map_escapes_tokens_and_shades_the_planted_one() -> None:
    from saeguard.report.ood_report import token_heatmap_html

    tokens = [
        {"token": "<script>alert(1)</script>", "fallacious_surprisal": 0.0, "latents": []},
        {"token": " x' onerror='y", "fallacious_surprisal": 9.0,
         "latents": [{"latent": 7, "weight": 9.0, "value": 1.5}]},
    ]  # fmt: skip
    page = token_heatmap_html(tokens, "fallacious_surprisal")
    assert "<script>" not in page and "onerror='y" not in page
    assert "&lt;script&gt;" in page and "latent 7" in page
    assert page.count("rgba(214,96,77,1.00)") == 1 and "rgba(214,96,77,0.00)" in page


def test_a_fused_monitor_with_a_missing_or_torn_reference_file_is_refused_in_one_line(
    tiny_monitor: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    from saeguard.errors import CorruptFileError

    reference = json.loads((tiny_monitor / "reference_scores.json").read_text())
    broken = tmp_path / "mon"
    shutil.copytree(tiny_monitor, broken)
    (broken / "reference_scores.json").unlink()
    with pytest.raises(CorruptFileError, match="reference_scores.json is missing"):
        Monitor.load(broken)
    (broken / "reference_scores.json").write_text(
        json.dumps({k: v[:5] for k, v in reference.items()})
    )
    with pytest.raises(CorruptFileError, match="holds 5 values"):
        Monitor.load(broken)
    (broken / "reference_scores.json").write_text(json.dumps({"knn": reference["knn"]}))
    assert main(["-q", "ood", "score", "--monitor", str(broken), "the cat"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks" in err[0] and "re-run `saeguard ood fit`" in err[0]

"""Each metric on hand-checkable cases, then the eval runner, schema and compare end to end."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from saeguard.errors import ConfigError
from saeguard.evals.absorption import AbsorptionConfig, measure_absorption
from saeguard.evals.ce import ce_and_kl_sums, results_from_sums
from saeguard.evals.core import CoreConfig, accumulate, metrics_from_sums
from saeguard.evals.datasets import LabelledSet
from saeguard.evals.effective import effective_count, run_effective
from saeguard.evals.ood_probing import OODProbingConfig
from saeguard.evals.probing import ProbingConfig, probe_set, top_k_by_mean_difference
from saeguard.evals.results import MetricResult, paired_difference, sampled_metric
from saeguard.jobs.eval import EvalConfig, load_eval, run_eval
from saeguard.models import load_model
from saeguard.sae import SAEConfig, create_sae
from saeguard.sae.io import save_sae


def _by_name(results: list[MetricResult]) -> dict[str, MetricResult]:
    return {r.name: r for r in results}


def _contexts(n: int = 12, d: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(10, d, generator=g) + 2 for _ in range(n)]


def test_core_perfect_and_zero_reconstruction() -> None:
    contexts = _contexts()
    mean = torch.cat(contexts).mean(0)
    perfect = accumulate(lambda x: (torch.ones(len(x), 4), x), contexts, mean, 4)
    core = _by_name(metrics_from_sums(perfect, d_in=8)[0])
    assert core["fvu"].value == 0 and core["explained_variance"].value == 1
    assert core["cosine"].value == pytest.approx(1) and core["l2_ratio"].value == pytest.approx(1)
    assert core["l0"].value == 4 and core["dead_frac"].value == 0 and core["dense_frac"].value == 1
    # Reconstructing every token by the mean gives FVU exactly 1 (whole-set definition).
    by_mean = accumulate(lambda x: (torch.zeros(len(x), 4), mean.expand_as(x)), contexts, mean, 4)
    core = _by_name(metrics_from_sums(by_mean, d_in=8)[0])
    assert core["fvu"].value == pytest.approx(1.0, abs=1e-6)
    assert core["dead_frac"].value == 1 and core["l0"].value == 0
    low, high = core["fvu"].ci  # type: ignore[misc]
    assert low <= 1.0 + 1e-6 and high >= 1.0 - 1e-6


def test_fvu_is_over_the_whole_set_not_a_mean_of_batches() -> None:
    # Two contexts with very different variance: the pooled ratio differs from the mean ratio.
    a, b = torch.randn(50, 4) * 0.1, torch.randn(50, 4) * 10
    mean = torch.cat([a, b]).mean(0)
    sums = accumulate(lambda x: (torch.ones(len(x), 1), x * 0.9 + 0.1 * mean), [a, b], mean, 1)
    fvu = _by_name(metrics_from_sums(sums, 4)[0])["fvu"].value
    x = torch.cat([a, b])
    x_hat = x * 0.9 + 0.1 * mean
    expected = float((x - x_hat).pow(2).sum() / (x - mean).pow(2).sum())
    assert fvu == pytest.approx(expected, rel=1e-5)


def test_ce_recovered_is_one_for_identity_and_zero_for_zeros(tiny_llama_dir: Path) -> None:
    loaded = load_model(str(tiny_llama_dir))
    point = loaded.hook_point("resid_post.1")
    tokens = torch.randint(5, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    identity = ce_and_kl_sums(loaded.model, point, tokens, None, lambda a: a)
    zeros = ce_and_kl_sums(loaded.model, point, tokens, None, torch.zeros_like)
    to_lists = lambda sums: {k: v.tolist() for k, v in sums.items()}  # noqa: E731
    ident = _by_name(results_from_sums(to_lists(identity)))
    zero = _by_name(results_from_sums(to_lists(zeros)))
    assert ident["ce_loss_recovered"].value == pytest.approx(1.0, abs=1e-5)
    assert ident["kl_recovered"].value == pytest.approx(1.0, abs=1e-5)
    assert zero["ce_loss_recovered"].value == pytest.approx(0.0, abs=1e-5)
    assert zero["kl_recovered"].value == pytest.approx(0.0, abs=1e-5)
    assert ident["ce_loss_zero"].value > ident["ce_loss_clean"].value  # splicing really happened
    # Splicing nowhere (keep all False) must leave the clean loss untouched.
    nowhere = ce_and_kl_sums(
        loaded.model, point, tokens, torch.zeros(3, 12, dtype=torch.bool), torch.zeros_like
    )
    assert torch.allclose(nowhere["zero"], nowhere["clean"])


def test_effective_features_counts() -> None:
    assert effective_count(torch.full((64,), 0.3)) == pytest.approx(64)
    assert effective_count(torch.tensor([5.0, 0, 0, 0])) == pytest.approx(1)
    half = effective_count(torch.tensor([1.0, 1.0, 0, 0]))
    assert half == pytest.approx(2)
    per_context = [torch.full((16,), 2.0) for _ in range(5)]
    f, per_dim = run_effective(per_context, d_in=8)
    assert f.value == pytest.approx(16) and per_dim.value == pytest.approx(2)


def _letter_words(n_per_letter: int, snake_words: int, d: int, seed: int):
    """Activations of words: 3 e_letter + noise; 'snake' words also carry 2 e_snake."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    snake = 26  # a direction orthogonal to every letter
    for letter in range(26):
        for i in range(n_per_letter):
            x = 0.05 * torch.randn(d, generator=g)
            x[letter] += 3
            if letter == string.ascii_lowercase.index("s") and i < snake_words:
                x[snake] += 2
            xs.append(x)
            ys.append(letter)
    return torch.stack(xs), np.array(ys)


def _letter_sae(d: int, planted: bool):
    """A ReLU SAE with one latent per letter (firing 2 on its words). ``planted`` adds a latent
    for 'snake' words that absorbs 's': there the 's' latent is off and the snake latent, whose
    decoder row mixes the 's' and snake directions, reconstructs the word instead."""
    sae = create_sae(SAEConfig(architecture="relu", d_in=d, d_sae=27))
    s, snake = string.ascii_lowercase.index("s"), 26
    with torch.no_grad():
        for tensor in (sae.W_enc, sae.W_dec, sae.b_dec):
            tensor.zero_()
        sae.b_enc.fill_(-1.0)
        for letter in range(26):  # W_enc is [d_in, d_sae], W_dec [d_sae, d_in]
            sae.W_enc[letter, letter] = 1.0
            sae.W_dec[letter, letter] = 1.0
        if planted:
            sae.W_enc[snake, s] = -1.5  # pre-activation of 's' on snake words: 3 - 3 - 1 < 0
            sae.W_enc[snake, snake] = 13**0.5 / 2
            sae.b_enc[snake] = -0.5
            row = torch.zeros(d)
            row[s], row[snake] = 3.0, 2.0
            sae.W_dec[snake] = row / row.norm()
        else:
            sae.b_enc[snake] = -100.0  # never fires
    return sae


def test_planted_absorbed_latent_is_measured_and_absent_one_is_not() -> None:
    d = 32
    cfg = AbsorptionConfig(words=60, seed=0)
    x_train, y_train = _letter_words(30, 1, d, seed=0)
    x_test, y_test = _letter_words(30, 1, d, seed=1)
    results = {}
    for planted in (True, False):
        metrics, details = measure_absorption(
            _letter_sae(d, planted), x_train, y_train, x_test, y_test, cfg
        )
        results[planted] = (_by_name(metrics), {e["letter"]: e for e in details["letters"]})
    with_plant, letters = results[True]
    s_entry = letters["s"]
    assert s_entry["counted"] and s_entry["main_latents"] == [18]
    assert 0 < s_entry["full_absorption"] <= 1 / 25  # the one snake word among ~30 's' words
    assert 0 < s_entry["absorption_fraction"] <= 1 / 25
    assert all(e["full_absorption"] == 0 for k, e in letters.items() if k != "s")
    assert with_plant["mean_full_absorption"].value > 0
    without, letters = results[False]
    assert without["mean_full_absorption"].value == 0
    assert without["absorption_fraction"].value == 0
    assert letters["s"]["counted"] and letters["s"]["full_absorption"] == 0


def test_planted_absorption_scores_above_its_controls() -> None:
    # plant_absorption (the check benchmarks/absorption_check.py runs on a real SAE) on the
    # letter SAE: token latents on a third of every letter's words either absorb the letter
    # (main latent off, decoder along the letter) or do not. The metric must tell them apart.
    from saeguard.evals.absorption import fit_letter_probe
    from saeguard.evals.planted import plant_absorption

    d, cfg = 32, AbsorptionConfig(words=60, seed=0)
    x_train, y_train = _letter_words(21, 0, d, seed=0)
    x_test, y_test = _letter_words(21, 0, d, seed=1)
    x, y = torch.cat([x_train, x_test]), np.concatenate([y_train, y_test])
    base = _letter_sae(d, planted=False)
    probe = fit_letter_probe(x_train, y_train, cfg.seed, cfg.probe_c)
    directions = {c: probe.coef_[i] for i, c in enumerate(probe.classes_)}
    mains = {c: [c] for c in range(26)}
    chosen = np.flatnonzero(np.arange(len(y)) % 3 == 0)
    rates = {}
    for mode in ("absorb", "takeover", "control", "suppress"):
        sae = plant_absorption(base, x, directions, mains, y, chosen, mode)
        metrics, details = measure_absorption(sae, x_train, y_train, x_test, y_test, cfg)
        rates[mode] = _by_name(metrics)["mean_full_absorption"].value
        assert all(e["main_latents"] == [string.ascii_lowercase.index(e["letter"])]
                   for e in details["letters"])  # fmt: skip
    # A third of each letter's words (7 of 21) are planted: the absorbing plants score about 1/3.
    assert 0.25 < rates["absorb"] < 0.42 and 0.25 < rates["takeover"] < 0.42
    assert rates["control"] == 0 and rates["suppress"] == 0


def test_sparse_probe_finds_the_separating_latent() -> None:
    rng = np.random.default_rng(0)
    n, width = 200, 50
    labels = np.array(["a", "b"] * (n // 2))
    sae = rng.normal(size=(n, width)) * 0.1
    sae[:, 7] += (labels == "a") * 2.0  # latent 7 alone tells a from b
    raw = rng.normal(size=(n, 4))  # raw features carry nothing
    data = LabelledSet("synthetic", ["t"] * n, labels.tolist())
    assert top_k_by_mean_difference(sae, labels == "a", 1).tolist() == [7]
    rows = probe_set({"sae": sae, "raw": raw}, data, ProbingConfig(ks=[1, 2], per_class=100))
    sae_k1 = [r["accuracy"] for r in rows if r["features"] == "sae" and r["k"] == 1]
    raw_all = [r["accuracy"] for r in rows if r["features"] == "raw" and r["k"] == "all"]
    assert min(sae_k1) > 0.95 and max(raw_all) < 0.8


def test_paired_difference_of_identical_metrics_is_zero_and_detects_a_shift() -> None:
    a = sampled_metric("m", 1, {"values": np.linspace(0, 1, 40)})
    same = paired_difference(a, a)
    assert same is not None and same[0] == 0 and same[1] == (0.0, 0.0)
    b = sampled_metric("m", 1, {"values": np.linspace(0, 1, 40) + 0.5})
    delta, (low, high) = paired_difference(a, b)  # type: ignore[misc]
    assert delta == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)
    c = sampled_metric("m", 1, {"values": np.random.default_rng(0).normal(size=40)})
    delta, (low, high) = paired_difference(a, c)  # type: ignore[misc]
    assert low < delta < high


def _eval_config(*flags: str) -> EvalConfig:
    """The EvalConfig `saeguard eval` builds from these flags (those of before nesting)."""
    from saeguard.cli import build_parser
    from saeguard.configs import config_from_args
    from saeguard.jobs.eval import EvalJobConfig

    job = config_from_args(EvalJobConfig, build_parser().parse_args(["eval", "sae", *flags]))
    assert job.sae_dir == "sae"
    return job.eval


def test_impossible_eval_configs_fail_early() -> None:
    with pytest.raises(ConfigError, match="choose from"):
        EvalConfig(evals=["core", "bogus"])
    with pytest.raises(ConfigError, match="probing sets"):
        _eval_config("--probing-sets", "nope")
    with pytest.raises(ConfigError, match="typo-rate"):
        _eval_config("--typo-rate", "0")
    with pytest.raises(ConfigError, match="absorption|words"):
        _eval_config("--absorption-words", "10")
    with pytest.raises(ConfigError, match="pooling"):
        _eval_config("--probing-pooling", "max")
    assert "core" in EvalConfig(evals=["effective"]).evals  # effective reuses the core pass
    cfg = _eval_config("--probing-per-class", "7", "--seed", "3", "--ood-k", "5")
    assert cfg.probing.per_class == cfg.ood_probing.per_class == 7  # one flag, both probes
    assert cfg.absorption.seed == cfg.probing.seed == cfg.ood_probing.seed == 3
    assert cfg.ood_probing.k == 5 and cfg.core.contexts == CoreConfig().contexts


def _tiny_sae(tiny_llama_dir: Path, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4))
    save_sae(
        sae,
        out,
        {"model": str(tiny_llama_dir), "hook": "resid_post.2", "corpus": "wiki-en", "ctx_len": 16},
    )
    return out


def test_eval_runner_writes_valid_json_html_resumes_and_compares(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from saeguard.cli import main

    cfg = dict(
        evals=["core", "ce", "effective", "probing", "ood_probing"], quick=True,
        probing=ProbingConfig(sets=["bbc"], ks=[1, 5], per_class=6),
        ood_probing=OODProbingConfig(shifts=["typos"]),
    )  # fmt: skip
    first = _tiny_sae(tiny_llama_dir, tmp_path / "a", 0)
    document = run_eval(first, EvalConfig(**cfg))  # type: ignore[arg-type]
    assert document["complete"]
    # The device it ran on is recorded, outside the settings and the per-eval signatures.
    assert document["device"] == "cpu" and "device" not in document["settings"]
    assert all("device" not in json.dumps(s) for s in document["eval_settings"].values())
    loaded, samples = load_eval(first)  # schema-validated
    metrics = loaded["metrics"]
    assert {"fvu", "ce_loss_recovered", "effective_features", "sparse_probing_accuracy_k1",
            "raw_probing_accuracy_all", "ood_probing_auc_typos"} <= set(metrics)  # fmt: skip
    assert metrics["l0"]["value"] == pytest.approx(4)
    assert metrics["fvu"]["ci95"][0] <= metrics["fvu"]["value"] <= metrics["fvu"]["ci95"][1]
    assert "fvu" in samples and (first / "eval.html").read_text().count("data:image/png") >= 2
    # A second run with the same settings keeps every finished eval.
    before = (first / "eval.json").read_text()
    run_eval(first, EvalConfig(**cfg))  # type: ignore[arg-type]
    assert (
        json.loads((first / "eval.json").read_text())["timings_s"]
        == json.loads(before)["timings_s"]
    )
    # Changing one eval's settings re-runs that eval only, and drops its stale metrics.
    changed = run_eval(
        first, EvalConfig(**{**cfg, "probing": ProbingConfig(sets=["bbc"], ks=[2], per_class=6)})
    )  # type: ignore[arg-type]
    kept = json.loads(before)["timings_s"]
    assert changed["timings_s"]["core"] == kept["core"] and changed["timings_s"]["ce"] == kept["ce"]
    assert "sparse_probing_accuracy_k2" in changed["metrics"]
    assert "sparse_probing_accuracy_k5" not in changed["metrics"] and changed["complete"]
    second = _tiny_sae(tiny_llama_dir, tmp_path / "b", 1)
    assert (
        main(
            [
                "eval",
                str(second),
                "--quick",
                "--evals",
                "core,ce",
                "--out",
                str(tmp_path / "b_eval"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "compare",
                str(first),
                str(tmp_path / "b_eval"),
                "--out",
                str(tmp_path / "cmp"),
                "--markdown",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "fvu" in printed and "Δ" in printed and (tmp_path / "cmp" / "compare.html").exists()
    assert "effective_features" in printed and "—" in printed  # missing in the second eval


def test_corrupt_eval_json_is_named(tmp_path: Path) -> None:
    (tmp_path / "eval.json").write_text('{"format": "saeguard-eval"')
    with pytest.raises(Exception, match="not a valid eval.json"):
        load_eval(tmp_path)


def test_the_eval_schema_names_exactly_the_registered_evals() -> None:
    """eval.schema.json is a published format, so it lists the eval names itself: it must list
    exactly the registry's (a new metric fails here until the schema knows it)."""
    from saeguard.evals import EVALS
    from saeguard.jobs.eval import EVAL_SCHEMA

    schema = json.loads(EVAL_SCHEMA.read_text(encoding="utf-8"))
    metric = schema["properties"]["metrics"]["additionalProperties"]["properties"]
    assert metric["eval"]["enum"] == list(EVALS)


def test_the_letter_probe_is_fitted_centred_so_a_huge_constant_dimension_hides_nothing() -> None:
    # Gemma-3-270M's residual has one near-constant dimension with ~95% of the norm. Divided by
    # the median norm alone, the letter directions shrank ~300x against the regularisation and no
    # letter's probe passed; the probe centres first, which leaves its directions unchanged.
    from sklearn.linear_model import LogisticRegression

    from saeguard.evals.absorption import fit_letter_probe

    d = 32
    x_train, y_train = _letter_words(8, 0, d, seed=0)
    x_test, y_test = _letter_words(4, 0, d, seed=1)
    offset = torch.zeros(d)
    offset[d - 1] = 1000.0
    probe = fit_letter_probe(x_train + offset, y_train, seed=0)
    assert (probe.predict(x_test + offset) == y_test).mean() > 0.95
    plain = fit_letter_probe(x_train, y_train, seed=0)
    cosines = (probe.coef_ * plain.coef_).sum(1) / (
        np.linalg.norm(probe.coef_, axis=1) * np.linalg.norm(plain.coef_, axis=1)
    )
    assert cosines.min() > 0.99  # the offset changes nothing about the letter directions
    scale = float((x_train + offset).norm(dim=-1).median())  # the old frame: one number only
    old = LogisticRegression(C=10.0, max_iter=5000, class_weight="balanced", random_state=0)
    old.fit(((x_train + offset) / scale).numpy(), y_train)
    assert (old.predict(((x_test + offset) / scale).numpy()) == y_test).mean() < 0.5

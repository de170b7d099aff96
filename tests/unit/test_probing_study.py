"""`saeguard study probing` (issue 19): the regimes' samplers, the SAE probe, the quiver, bad user
data, and the --quick study end to end on a tiny model, resumed without a forward pass."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from saeguard.cli import main
from saeguard.data.perturb import add_typos
from saeguard.evals import probing_regimes as pr
from saeguard.evals.probing_regimes import (
    ProbeTask,
    RegimeConfig,
    SaeProbe,
    fit_method,
    flip_labels,
    imbalance_sample,
    mean_difference_order,
    quiver_pick,
    regime_points,
    scarcity_sample,
    select_latents,
    validation_splits,
)
from saeguard.evals.probing_tasks import (
    UNSEEN_TEMPLATES,
    build_sources,
    feature_table,
    jailbreak_source,
    make_tasks,
)
from saeguard.fileio import validate_document
from saeguard.jobs import probing_study
from saeguard.jobs.probing_study import SCHEMA, ProbingStudyConfig, run_probing_study


def _task(n_pos: int = 60, n_neg: int = 80) -> ProbeTask:
    labels = np.array([True] * n_pos + [False] * n_neg)
    rows = np.arange(len(labels)) + 1000
    test_rows, test_labels = np.arange(20), np.arange(20) % 2 == 0
    return ProbeTask(
        "toy:a",
        "toy",
        "a",
        rows,
        labels,
        test_rows,
        test_labels,
        shifts={"typos:0.2": (test_rows + 500, test_labels)},
    )


# --- samplers -----------------------------------------------------------------------------------
def test_each_regime_samples_what_it_says() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([True] * 50 + [False] * 70)
    for n in (2, 7, 32, 100):
        idx = scarcity_sample(labels, n, rng)
        assert len(idx) == n == len(set(idx.tolist())) and labels[idx].sum() == n // 2
    for fraction in (0.05, 0.25, 0.75, 0.95):
        idx = imbalance_sample(labels, 40, fraction, rng)
        assert len(idx) == 40 and labels[idx].sum() == max(1, round(fraction * 40))
    noisy, flipped = flip_labels(labels, 0.3, rng)
    assert len(flipped) == round(0.3 * len(labels)) == int((noisy != labels).sum())
    assert np.array_equal(np.flatnonzero(noisy != labels), flipped)

    task, cfg = _task(), RegimeConfig(fixed_train=40, train_sizes=[2, 8, 64, 256])
    scarcity = regime_points(task, "scarcity", cfg, 0)
    assert [p.value for p in scarcity] == [2, 8, 64]  # 256 > 2 x 60 positives: capped
    assert all(
        len(p.train_rows) == p.value and p.train_labels.sum() == p.value // 2 for p in scarcity
    )
    imbalance = regime_points(task, "imbalance", cfg, 0)
    assert [round(p.train_labels.mean(), 3) for p in imbalance] == [
        round(max(1, round(f * 40)) / 40, 3) for f in cfg.positive_fractions
    ]
    noise = regime_points(task, "noise", cfg, 0)
    clean = noise[0]
    assert clean.value == 0 and clean.flipped == 0
    truth = dict(zip(task.pool_rows.tolist(), task.pool_labels.tolist(), strict=True))
    for point in noise:  # the same training texts; only their labels flip, the test stays clean
        assert np.array_equal(point.train_rows, clean.train_rows)
        flipped = sum(
            truth[r] != y
            for r, y in zip(point.train_rows.tolist(), point.train_labels.tolist(), strict=True)
        )
        assert flipped == point.flipped == round(float(point.value) * 40)
        assert np.array_equal(point.test_labels, task.test_labels)
        assert np.array_equal(point.test_rows, task.test_rows)
    (shift,) = regime_points(task, "shift", cfg, 0)
    assert np.array_equal(shift.train_rows, clean.train_rows)  # trained clean, as noise=0
    assert np.array_equal(shift.train_labels, clean.train_labels)
    assert np.array_equal(shift.test_rows, task.test_rows + 500) and shift.test == "typos:0.2"
    assert np.array_equal(shift.test_labels, task.test_labels)
    # every point of a regime is drawn from the pool, never from the test rows
    assert not set(clean.train_rows.tolist()) & set(task.test_rows.tolist())


def test_validation_folds_hold_both_classes_and_never_the_whole_set() -> None:
    for n, expected in ((4, "pairs"), (12, "pairs"), (40, "folds"), (300, "hold-out")):
        labels = np.arange(n) % 3 == 0
        splits = validation_splits(labels, seed=1, max_pairs=16, folds=6)
        assert splits, n
        for fit_part, val_part in splits:
            assert not set(fit_part.tolist()) & set(val_part.tolist())
            assert len(fit_part) + len(val_part) == n
            assert labels[val_part].any() and (~labels[val_part]).any()
        if expected == "pairs":
            assert all(len(v) == 2 for _, v in splits) and len(splits) <= 16
        elif expected == "folds":
            assert len(splits) == 6
            assert sorted(np.concatenate([v for _, v in splits]).tolist()) == list(range(n))
        else:
            assert len(splits) == 1 and len(splits[0][1]) == 60
    assert validation_splits(np.array([True, False, False]), 0) == []  # one positive: defaults


def test_covariate_shift_changes_only_the_test_texts(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    rows = [
        {
            "text": f"text number {i} about {'cats' if i % 2 else 'dogs'} and rivers",
            "label": "cat" if i % 2 else "dog",
        }
        for i in range(60)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    sources = build_sources(
        [], [str(path)], per_class=30, classes=1, test_fraction=0.3, typo_rate=0.5, seed=3
    )
    table = feature_table(sources)
    (task,) = make_tasks(sources, table, seed=3)
    assert task.positive == "dog"  # two equal classes: the later name is the positive
    shift_rows, shift_labels = task.shifts["typos:0.5"]
    assert np.array_equal(shift_labels, task.test_labels)
    for clean_row, shifted_row in zip(task.test_rows, shift_rows, strict=True):
        clean, shifted = table.texts[clean_row], table.texts[shifted_row]
        assert shifted == add_typos(clean, 0.5, 3) != clean
    pool = {table.texts[r] for r in task.pool_rows}
    assert not pool & {table.texts[r] for r in shift_rows}
    assert not pool & {table.texts[r] for r in task.test_rows}


def test_unseen_jailbreak_templates_never_reach_training() -> None:
    source = jailbreak_source(per_class=40, test_fraction=0.3, typo_rate=0.2, seed=0)
    shift = next(s for s in source.shifts if s.name == UNSEEN_TEMPLATES)
    test_texts = source.test_texts()
    assert len(shift.texts) == len(test_texts) and shift.paired
    train_wrapped = [
        t
        for t, lab, m in zip(source.data.texts, source.data.labels, source.test, strict=True)
        if lab == "wrapped" and not m
    ]
    rewrapped = 0
    for position, old, new in zip(
        np.flatnonzero(source.test), test_texts, shift.texts, strict=True
    ):
        if source.data.labels[position] == "plain":
            assert new == old
            continue
        template = new.rsplit("\n\n", 1)[0]  # the question stays; the template is new
        assert new != old and new.endswith(old.rsplit("\n\n", 1)[1])
        assert not any(t.startswith(template + "\n\n") for t in train_wrapped)
        rewrapped += 1
    assert rewrapped > 0


# --- the SAE probe and the quiver ---------------------------------------------------------------
def test_the_sae_probe_finds_the_planted_latent() -> None:
    rng = np.random.default_rng(0)
    n, d = 240, 300
    y = np.arange(n) % 2 == 0
    x = np.where(rng.random((n, d)) < 0.05, rng.exponential(1.0, (n, d)), 0.0)
    x[:, 17] = np.where(y & (rng.random(n) < 0.9), 0.3 + 0.05 * rng.random(n), 0.0)
    x[:, 3] = np.where(rng.random(n) < 0.5, 1000 * rng.random(n), 0.0)  # loud, uninformative
    assert mean_difference_order(x, y)[0] == 3  # raw mean difference is fooled by its scale...
    assert select_latents(x, y, 1).tolist() == [17]  # ...the normalised one is not
    train, test = np.arange(160), np.arange(160, n)
    cfg = RegimeConfig(sae_ks=[1, 4, 64])
    fit = fit_method(SaeProbe(cfg, 0), x[train], y[train], x[test], validation_splits(y[train], 0))
    # 90% of positives fire: a perfect probe reaches about 0.95
    assert fit.val_auc > 0.8 and pr.auc(y[test], fit.test_scores) > 0.85


def test_the_quiver_picks_the_best_validation_auc() -> None:
    members = ["logreg", "pca", "knn", "mlp", "hgb"]
    assert (
        quiver_pick({"logreg": 0.7, "pca": 0.9, "knn": 0.8, "mlp": 0.6, "hgb": 0.5}, members)
        == "pca"
    )
    assert quiver_pick({"logreg": 0.8, "pca": 0.8, "sae": 0.95}, ["logreg", "pca"]) == "logreg"
    assert quiver_pick({"logreg": 0.8, "pca": 0.8, "sae": 0.95}, [*members, "sae"]) == "sae"
    assert quiver_pick({"logreg": float("nan"), "knn": 0.6}, members) == "knn"
    assert quiver_pick({m: float("nan") for m in members}, members) == "logreg"


def test_every_built_in_set_gives_its_tasks_and_shifts() -> None:
    sources = build_sources(["wiki-en", "bbc", "language", "jailbreak"], [], per_class=60,
                            classes=2, test_fraction=0.25, typo_rate=0.2, seed=0)  # fmt: skip
    table = feature_table(sources)
    tasks = {t.name: t for t in make_tasks(sources, table, seed=0)}
    assert set(tasks) == {
        "wiki-en:People",
        "wiki-en:Biology and health sciences",
        "bbc:sports",
        "bbc:business",
        "language:en",
        "language:fr",
        "jailbreak:wrapped",
    }
    people = tasks["wiki-en:People"]
    assert set(people.shifts) == {"typos:0.2", "wiki-es", "wiki-fr"}
    wiki = {table.texts[r] for r in np.concatenate([people.pool_rows, people.test_rows])}
    for lang in ("wiki-es", "wiki-fr"):  # other documents, balanced, none of them English
        rows, labels = people.shifts[lang]
        assert labels.sum() == (~labels).sum() >= 2 and not {table.texts[r] for r in rows} & wiki
    # wiki-es has no "Biology and health sciences" topic: that task tests on French only
    assert set(tasks["wiki-en:Biology and health sciences"].shifts) == {"typos:0.2", "wiki-fr"}
    assert set(tasks["jailbreak:wrapped"].shifts) == {"typos:0.2", UNSEEN_TEMPLATES}
    for task in tasks.values():  # a balanced test side, and a pool disjoint from every test
        assert task.test_labels.sum() == (~task.test_labels).sum() > 0
        tested = set(task.test_rows.tolist()).union(*[r.tolist() for r, _ in task.shifts.values()])
        assert not set(task.pool_rows.tolist()) & tested


# --- bad user data ------------------------------------------------------------------------------
@pytest.fixture()
def tiny_sae(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    from saeguard.sae import SAEConfig, create_sae
    from saeguard.sae.io import save_sae

    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4))
    return save_sae(
        sae,
        tmp_path / "sae",
        {"model": str(tiny_llama_dir), "hook": "resid_post.2", "corpus": "wiki-en", "ctx_len": 32},
    )


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _many(label_of: str, n: int = 10) -> str:
    return "\n".join(json.dumps({"text": f"text {i}", "label": label_of}) for i in range(n))


BAD_DATA = {
    "missing.jsonl": (None, "no such file"),
    "no_label.csv": ("text,topic\n" + "\n".join(f"t{i},a" for i in range(20)), "'label'"),
    "no_label.jsonl": ("\n".join(json.dumps({"text": f"t{i}"}) for i in range(20)), "no 'label'"),
    "one_class.jsonl": (_many("a", 20), "single class"),
    "latin1.csv": (b"text,label\n" + "caf\xe9 au lait,a\n".encode("latin-1"), "UTF-8"),
    "empty_text.jsonl": (_many("a") + "\n" + json.dumps({"text": "  ", "label": "b"}), "empty"),
    "tiny_class.jsonl": (_many("a") + "\n" + _many("b", 2), "needs at least"),
    "data.txt": ("a text", ".jsonl"),
}


@pytest.mark.parametrize("name", list(BAD_DATA))
def test_bad_user_data_is_one_line_and_status_2(
    name: str,
    tiny_sae: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    content, message = BAD_DATA[name]
    path = tmp_path / name if content is None else _write(tmp_path / name, content)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(
        [
            "-q",
            "study",
            "probing",
            str(tiny_sae),
            "--out",
            str(out),
            "--data",
            str(path),
            "--tasks",
            "",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("saeguard: error") and message in err[0], err[0]
    assert not out.exists()  # refused before anything was written


# --- end to end ---------------------------------------------------------------------------------
def test_quick_probing_study_end_to_end_then_resumed_without_the_model(
    tiny_sae: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "study"
    mine = tmp_path / "mine.csv"  # a user's file beside a built-in set (CI-sized: two tasks)
    mine.write_text("text,label\n" + "".join(f"{'the cat sat' if i % 2 else 'stocks fell'} on "
                    f"day {i},{'pets' if i % 2 else 'money'}\n" for i in range(40)))  # fmt: skip
    cfg = ProbingStudyConfig(sae_dir=str(tiny_sae), out=str(out), quick=True, device="cpu",
                             tasks=["jailbreak"], data=[str(mine)], threads=1)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        document = run_probing_study(cfg)
    finally:
        torch.set_num_threads(threads)
    for name in ("probing_study.json", "probing_study.md", "probing_study.html"):
        assert (out / name).is_file()
    written = json.loads((out / "probing_study.json").read_text())
    validate_document(written, SCHEMA)
    assert written["finding"] == document["finding"]
    summary = written["summary"]
    assert set(summary["regimes"]) == set(pr.REGIMES)
    assert {t["name"] for t in written["tasks"]} == {"jailbreak:wrapped", "data:mine:pets"}
    assert all(m in written["methods"] for m in pr.METHODS)  # --quick runs every method
    overall = summary["overall"]
    counts = overall["sae_vs_best"]
    assert sum(counts.values()) == overall["points"] > 0
    assert f"on {counts['win']} of {overall['points']} task x regime points" in written["finding"]
    points = [p for regimes in written["results"].values() for ps in regimes.values() for p in ps]
    assert len(points) == overall["points"]
    for p in points:  # each quiver took the member with the best validation AUC
        val = {
            m: e["val_auc"] if e["val_auc"] is not None else math.nan
            for m, e in p["methods"].items()
        }
        baselines = [m for m in written["methods"] if m != "sae"]
        assert p["quiver"]["picked"] == quiver_pick(val, baselines)
        assert p["quiver_sae"]["picked"] == quiver_pick(val, [*baselines, "sae"])
        best = max(p["methods"][m]["test_auc"] for m in baselines)
        assert p["methods"][p["best_baseline"]]["test_auc"] == best
    markdown = (out / "probing_study.md").read_text()
    assert "| SAE probe |" in markdown and "win / tie / loss" in markdown
    assert document["finding"] in markdown
    assert "data:image/png" in (out / "probing_study.html").read_text()
    assert written["features"]["computed_texts"] == written["features"]["texts"]

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a resumed study must not run the model or the probes again")

    monkeypatch.setattr(probing_study, "load_subject", forbidden)
    monkeypatch.setattr(probing_study, "pooled_features", forbidden)
    monkeypatch.setattr(probing_study, "run_regime", forbidden)
    again = run_probing_study(replace(cfg, threads=0))
    assert again["results"] == written["results"] and again["finding"] == written["finding"]
    assert again["computed_regimes"] == 0 and again["features"]["computed_texts"] == 0

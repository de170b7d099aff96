"""The trainer: learning, bit-exact resume, several SAEs per pass, masking, the train command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from saeguard.activations import ActivationSourceConfig, ModelActivationSource
from saeguard.errors import ConfigError, SaeguardError
from saeguard.jobs.train import TrainJobConfig, run_training
from saeguard.sae import ARCHITECTURES, SAEConfig, create_sae
from saeguard.sae.io import load_sae
from saeguard.train import Trainer, TrainerConfig, geometric_median, lr_factor

D, N_FEATURES = 16, 64


def _features() -> torch.Tensor:
    w = torch.randn(N_FEATURES, D, generator=torch.Generator().manual_seed(123))
    return w / w.norm(dim=-1, keepdim=True)


def _batches(n_batches: int, size: int = 256, seed: int = 0) -> list[torch.Tensor]:
    """Sparse combinations of 64 directions plus an offset: an SAE can learn them."""
    feats, out = _features(), []
    for i in range(n_batches):
        g = torch.Generator().manual_seed(seed + i)
        on = torch.rand(size, N_FEATURES, generator=g) < 0.05
        coef = on * (1 + 2 * torch.rand(size, N_FEATURES, generator=g))
        out.append(coef @ feats + 0.5)
    return out


def _trainer(out: Path, archs: tuple[str, ...] = ("topk",), **kw: object) -> Trainer:
    saes = {a: create_sae(SAEConfig(architecture=a, d_in=D, d_sae=128, k=4)) for a in archs}
    base: dict[str, object] = {
        "tokens": 256 * 40, "batch_tokens": 256, "buffer_tokens": 512, "lr": 3e-3,
        "checkpoint_every": 5, "lr_warmup_steps": 4, "sparsity_warmup_steps": 5,
    }  # fmt: skip
    base.update(kw)
    return Trainer(saes, TrainerConfig(**base), out)  # type: ignore[arg-type]


def test_topk_beats_pca_with_k_components(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, tokens=256 * 80)
    trainer.fit(_batches(80))
    x = _batches(1, 4096, seed=10_000)[0]  # held out
    sae, _ = load_sae(tmp_path)
    with torch.no_grad():
        fvu = float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    train = torch.cat(_batches(80))
    mean = train.mean(0)
    _, _, v = torch.linalg.svd(train - mean, full_matrices=False)
    basis = v[:4].t()  # PCA with k = 4 components, fitted on the training data
    pca = (x - mean) @ basis @ basis.t() + mean
    pca_fvu = float((pca - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < pca_fvu, (fvu, pca_fvu)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["topk/fvu"] > lines[-1]["topk/fvu"]
    assert {"topk/l0", "topk/dead_frac", "tokens_per_s"} <= set(lines[-1])


def test_resume_gives_bit_identical_weights(tmp_path: Path) -> None:
    archs = ("topk", "batchtopk", "vsae", "gated")  # vsae: its noise continues where it was
    reference = _trainer(tmp_path / "ref", archs)
    reference.fit(_batches(40))

    def crashing(n: int):
        for i, batch in enumerate(_batches(40)):
            if i == n:
                raise KeyboardInterrupt  # a kill between steps
            yield batch

    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "run", archs).fit(crashing(23))
    assert json.loads((tmp_path / "run/checkpoint/state.json").read_text())["step"] == 20
    resumed = _trainer(tmp_path / "run", archs)
    resumed.fit(_batches(40))
    for name in archs:
        a, b = reference.saes[name].state_dict(), resumed.saes[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(set(steps))  # no duplicated metric lines after the resume


def test_a_checkpoint_saved_under_one_device_resumes_under_another(tmp_path: Path) -> None:
    """Checkpoints hold CPU tensors and leave the device out of the run's identity: a run
    started with --device cpu resumes with --device auto (a GPU where there is one) to the
    weights of the uninterrupted run."""
    from dataclasses import dataclass

    from safetensors import safe_open

    from saeguard.devices import resolve_device

    @dataclass(kw_only=True)
    class DeviceConfig(TrainerConfig):
        device: str = "cpu"

    settings: dict[str, Any] = {"tokens": 256 * 30, "batch_tokens": 256, "buffer_tokens": 512,
                                "checkpoint_every": 5}  # fmt: skip

    def trainer(out: Path, device: str) -> Trainer:
        sae = create_sae(SAEConfig(architecture="topk", d_in=D, d_sae=128, k=4))
        cfg = DeviceConfig(device=device, **settings)
        return Trainer({"topk": sae}, cfg, out, device=resolve_device(device))

    reference = trainer(tmp_path / "ref", "cpu")
    reference.fit(_batches(30))

    def crashing(n: int):
        yield from _batches(30)[:n]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "run", "cpu").fit(crashing(12))
    state = tmp_path / "run/checkpoint/state.safetensors"
    with safe_open(str(state), framework="pt") as handle:
        identity = json.loads(handle.metadata()["state"])["identity"]
    assert "device" not in identity["trainer"]
    resumed = trainer(tmp_path / "run", "auto")
    resumed.fit(_batches(30))
    assert resumed.trained_steps == 20  # from the step-10 checkpoint, not from the start
    a, b = reference.saes["topk"].state_dict(), resumed.saes["topk"].state_dict()
    assert all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_bad_batches_fail_clearly(tmp_path: Path) -> None:
    bad = _batches(3)
    bad[1][5, 3] = float("nan")
    with pytest.raises(SaeguardError, match="NaN or inf"):
        _trainer(tmp_path / "a").fit(bad)
    with pytest.raises(SaeguardError, match=r"shape \(256, 12\)"):
        _trainer(tmp_path / "b").fit([torch.randn(256, 12)])
    with pytest.raises(ConfigError, match="less than one batch"):
        TrainerConfig(tokens=10, batch_tokens=256)


def test_schedule_and_geometric_median() -> None:
    assert lr_factor(0, 100, 10, 0.2) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, 0.2) == 1.0
    assert lr_factor(90, 100, 10, 0.2) == pytest.approx(0.5)
    assert lr_factor(0, 20, 50, 0.2) == pytest.approx(0.5)  # warm-up capped at a tenth of the run
    points = torch.cat([torch.zeros(50, 2), torch.full((5, 2), 100.0)])
    assert geometric_median(points).norm() < 1.0 < points.mean(0).norm()


def _job(model_dir: Path, corpus: Path, out: Path, **kw: object) -> TrainJobConfig:
    base: dict[str, object] = {
        "model": str(model_dir), "hooks": ["resid_post.2"], "corpus": str(corpus),
        "split": "all", "ctx_len": 16, "batch_size": 8, "calibration_contexts": 4,
        "tokens": 1024, "batch_tokens": 128, "buffer_tokens": 256, "expansion": [2], "k": [4],
        "eval_tokens": 0, "out": str(out), "checkpoint_every": 0,
    }  # fmt: skip
    base.update(kw)
    return TrainJobConfig(**base)  # type: ignore[arg-type]


def test_mask_prob_zero_reproduces_baseline_exactly(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    run_training(_job(tiny_llama_dir, text_corpus, tmp_path / "base"))
    run_training(_job(tiny_llama_dir, text_corpus, tmp_path / "p0", mask_prob=0.0, mask_seed=7))
    a, _ = load_sae(tmp_path / "base")
    b, _ = load_sae(tmp_path / "p0")
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


def test_masking_masks_the_asked_fraction_and_is_recorded(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    common = {
        "model": str(tiny_llama_dir), "hooks": ["resid_post.2"], "corpus": str(text_corpus),
        "split": "all", "ctx_len": 16, "batch_size": 8, "calibration_contexts": 4,
        "repeat": False, "outlier_multiple": 0.0,
    }  # fmt: skip
    base = sum(len(c) for c in ModelActivationSource(ActivationSourceConfig(**common)))
    masked = ModelActivationSource(ActivationSourceConfig(**common, mask_prob=0.15))
    kept = sum(len(c) for c in masked)
    fraction = masked.harvester.masked_fraction
    assert 0.12 < fraction < 0.18
    assert kept == pytest.approx(base * (1 - fraction), rel=0.02)  # masked positions dropped
    info = masked.describe()["masking"]
    assert info["mask_prob"] == 0.15 and info["mask_token"] == "<mask>"
    kept_all = ModelActivationSource(
        ActivationSourceConfig(**common, mask_prob=0.15, keep_masked_positions=True)
    )
    assert sum(len(c) for c in kept_all) == base
    # The saved SAE records the settings and the measured fraction.
    run_training(_job(tiny_llama_dir, text_corpus, tmp_path / "m", mask_prob=0.15))
    _, meta = load_sae(tmp_path / "m")
    assert meta["masking"]["mask_prob"] == 0.15 and 0.1 < meta["masking"]["masked_fraction"] < 0.2


def test_mask_token_must_be_one_token(tiny_llama_dir: Path, text_corpus: Path) -> None:
    cfg = ActivationSourceConfig(
        model=str(tiny_llama_dir), corpus=str(text_corpus), hooks=["resid_post.1"],
        mask_prob=0.1, mask_token="two words here",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="must be exactly one token"):
        ModelActivationSource(cfg)
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"--mask-prob must lie in \[0, 1\)"):
            ActivationSourceConfig(mask_prob=bad)


def test_several_saes_in_one_pass_and_from_a_cache(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    from saeguard.jobs.harvest import HarvestConfig, harvest

    cache = tmp_path / "acts"
    harvest(HarvestConfig(model=str(tiny_llama_dir), hooks=["resid_post.2"],
                          corpus=str(text_corpus), split="all", ctx_len=16,
                          calibration_contexts=4, tokens=1500, shard_tokens=256,
                          out=str(cache)))  # fmt: skip
    job = _job(tiny_llama_dir, text_corpus, tmp_path / "grid", acts=str(cache),
               architectures=["topk", "relu"], k=[2, 4], eval_tokens=256)  # fmt: skip
    results = run_training(job)
    names = {"topk_k2_x2", "topk_k4_x2", "relu_k2_x2", "relu_k4_x2"}
    assert set(results["saes"]) == names
    for name in names:
        sae, meta = load_sae(tmp_path / "grid" / name)
        assert meta["source"] == "cache" and meta["hook"] == "resid_post.2"
        assert 0 <= results["saes"][name]["held_out"]["fvu"] < 2
    assert results["saes"]["topk_k2_x2"]["held_out"]["l0"] <= 2


def test_impossible_job_configs() -> None:
    with pytest.raises(ConfigError, match="--expansion must be a positive"):
        TrainJobConfig(out="x", expansion=[-2])
    with pytest.raises(ConfigError, match="unknown SAE architecture"):
        TrainJobConfig(out="x", architectures=["bogus"])
    with pytest.raises(ConfigError, match="cannot exceed"):
        TrainJobConfig(out="x", k=[100], expansion=[1]).sae_configs(64)


def test_torn_metrics_line_and_finished_rerun(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, tokens=256 * 10)
    trainer.fit(_batches(10))
    cfg_before = (tmp_path / "cfg.json").read_text()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 11, "topk/lo')  # a kill mid-write
    again = _trainer(tmp_path, tokens=256 * 10)
    again.fit(_batches(10))  # resumes at the end: nothing trained, nothing overwritten
    assert (tmp_path / "cfg.json").read_text() == cfg_before
    assert again.history["topk"]["fvu"] == trainer.history["topk"]["fvu"]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_specials_are_never_masked_even_when_kept(tiny_llama_dir: Path, text_corpus: Path) -> None:
    cfg = ActivationSourceConfig(
        model=str(tiny_llama_dir), corpus=str(text_corpus), hooks=["resid_post.1"],
        split="all", ctx_len=16, calibration_contexts=4, mask_prob=0.5,
        exclude_special=False, outlier_multiple=0.0,
    )  # fmt: skip
    source = ModelActivationSource(cfg)
    contexts = source.prepared.contexts()
    tokens = torch.tensor([next(contexts) for _ in range(8)])
    spec = source.prepared.masking
    assert spec is not None
    masked = spec.draw(tokens, 0, ~source.harvester.rules.is_special(tokens))
    assert not masked[:, 0].any()  # position 0 holds the start token
    assert masked.float().mean() > 0.3


def test_tensorboard_logging_writes_the_metrics(tmp_path: Path) -> None:
    """The TensorBoard event file holds the same per-step scalars as metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _trainer(tmp_path, tokens=256 * 10, logger="tensorboard").fit(_batches(10))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scalars = events.Scalars("topk/fvu")
    assert [s.step for s in scalars] == [line["step"] for line in lines]
    assert scalars[-1].value == pytest.approx(lines[-1]["topk/fvu"], rel=1e-6)


def test_wandb_logging_sends_every_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B is optional; a stand-in module records what the trainer sends to ``run.log``."""
    import sys
    import types

    sent: list[tuple[dict[str, float], int]] = []

    class Run:
        def log(self, data: dict[str, float], step: int) -> None:
            sent.append((dict(data), step))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: Run()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _trainer(tmp_path, tokens=256 * 6, logger="wandb").fit(_batches(6))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [step for _, step in sent] == [line["step"] for line in lines]
    assert sent[-1][0]["topk/fvu"] == pytest.approx(lines[-1]["topk/fvu"])


def test_missing_logger_package_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    with pytest.raises(SaeguardError, match="pip install wandb"):
        _trainer(tmp_path, tokens=256 * 2, logger="wandb").fit(_batches(2))


@pytest.mark.parametrize(
    ("optimizer", "schedule_free"), [("adam", False), ("signsgd", True), ("adam", True)]
)
def test_every_optimizer_resumes_to_identical_saved_weights(
    tmp_path: Path, optimizer: str, schedule_free: bool
) -> None:
    settings = {"optimizer": optimizer, "schedule_free": schedule_free, "lr": None}
    _trainer(tmp_path / "ref", **settings).fit(_batches(40))

    def crashing(n: int):
        for i, batch in enumerate(_batches(40)):
            if i == n:
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "run", **settings).fit(crashing(17))
    _trainer(tmp_path / "run", **settings).fit(_batches(40))
    ref = (tmp_path / "ref/sae_weights.safetensors").read_bytes()
    assert (tmp_path / "run/sae_weights.safetensors").read_bytes() == ref


def test_checkpoints_at_any_moment_leave_training_unchanged(tmp_path: Path) -> None:
    """Time-based checkpoints fall on different steps in different runs: they must not perturb
    the schedule-free state (the saved average is computed out of place)."""
    _trainer(tmp_path / "none", checkpoint_every=0, checkpoint_minutes=0).fit(_batches(40))
    every = _trainer(tmp_path / "every", checkpoint_every=0, checkpoint_minutes=1e-9)
    every.fit(_batches(40))
    a = (tmp_path / "none/sae_weights.safetensors").read_bytes()
    assert (tmp_path / "every/sae_weights.safetensors").read_bytes() == a


def test_schedule_free_saves_the_average_and_sign_sgd_steps_by_lr(tmp_path: Path) -> None:
    from saeguard.train.optim import SaeOptimizer, SignSGD, default_lr

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    p.grad = torch.tensor([0.5, -1e-6, 0.0])
    SignSGD([p], lr=0.1).step()
    assert torch.allclose(p.detach(), torch.tensor([0.9, -1.9, 3.0]))
    assert default_lr("signsgd", 16_384) == pytest.approx(5e-3)
    assert default_lr("signsgd", 4 * 16_384) == pytest.approx(2.5e-3)

    trainer = _trainer(tmp_path, tokens=256 * 10, optimizer="signsgd", schedule_free=True)
    trainer.fit(_batches(10))
    opt: SaeOptimizer = trainer.optimizers["topk"]
    sae = trainer.saes["topk"]
    z = opt.base.state[sae.W_dec]["z"]
    average = sae.W_dec.detach().lerp(z, 1 - 1 / 0.95)
    assert not torch.equal(average, sae.W_dec.detach())  # y (trained) and x (saved) differ
    saved, _ = load_sae(tmp_path)
    assert torch.allclose(saved.W_dec * trainer.scale, average, atol=1e-6)


def test_fused_schedule_free_sign_sgd_matches_the_package_wrapper() -> None:
    """Our four-pass step is the package's ScheduleFreeWrapper(SignSGD), composed: same y, same z
    and the same averaging scalars after steps with a changing learning rate."""
    import schedulefree

    from saeguard.train.optim import ScheduleFreeSignSGD, SignSGD

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    fused = ScheduleFreeSignSGD(ours, lr=0.01, momentum=0.9)
    reference = schedulefree.ScheduleFreeWrapper(SignSGD(theirs, lr=0.01), momentum=0.9)
    reference.train()
    for step, lr in enumerate([0.002, 0.005, 0.01, 0.01, 0.008, 0.01]):
        grads = [torch.randn_like(p) for p in ours]
        grads[0][0, 0] = 0.0  # sign(0) = 0: that weight's z stays put
        for params in (ours, theirs):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
        fused.param_groups[0]["lr"] = lr
        reference.param_groups[0]["lr"] = lr
        fused.step()
        reference.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.allclose(a, b, atol=1e-6), step
            assert torch.allclose(fused.state[a]["z"], reference.state[b]["z"], atol=1e-6)
    group, ref_group = fused.param_groups[0], reference.param_groups[0]
    assert group["k"] == ref_group["k"] == 6
    assert group["weight_sum"] == pytest.approx(ref_group["weight_sum"])


def test_optimizer_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="sf-momentum"):
        TrainerConfig(sf_momentum=1.0)
    with pytest.raises(ConfigError, match="checkpoint-minutes"):
        TrainerConfig(checkpoint_minutes=-1)
    with pytest.raises(ConfigError, match="--optimizer"):
        TrainerConfig(optimizer="sgd")  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_learns_with_the_default_optimiser(tmp_path: Path, arch: str) -> None:
    """sign-SGD + schedule-free is the default for all of them: each must still learn."""
    x = _batches(1, 2048, seed=10_000)[0]  # held out
    saes = {arch: create_sae(SAEConfig(architecture=arch, d_in=D, d_sae=128, k=4))}
    trainer = Trainer(saes, TrainerConfig(tokens=256 * 60, batch_tokens=256, buffer_tokens=512,
                                          checkpoint_every=0), tmp_path)  # fmt: skip
    trainer._initialise(_batches(1)[0])
    before = trainer.folded(arch)
    trainer.fit(_batches(60))
    after, _ = load_sae(tmp_path)
    with torch.no_grad():
        fvu = [float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
               for sae in (before, after)]  # fmt: skip
    if arch == "relu":  # its L1 penalty (lambda 5) trades reconstruction for sparsity here
        assert fvu[1] < 0.8 * fvu[0], fvu
    else:
        assert fvu[1] < 0.7 * fvu[0] and fvu[1] < 0.5, fvu


def test_a_checkpoint_of_the_flat_job_config_still_resumes(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    """A checkpoint written before the job's loss settings moved into ``sae`` (flat aux_coef,
    k_aux, dead_tokens, l1_coef, l0_target; every architecture's settings in each SAE config)
    is the same run: the re-run resumes it instead of refusing it as other settings."""
    import json as json_module

    from safetensors import safe_open
    from safetensors.torch import save_file

    job = _job(tiny_llama_dir, text_corpus, tmp_path / "old")
    run_training(job)
    state_file = tmp_path / "old" / "checkpoint" / "state.safetensors"
    with safe_open(str(state_file), "pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    state = json_module.loads(metadata["state"])
    trainer = state["identity"]["trainer"]
    trainer.update(trainer.pop("sae"), l0_target=0.0)  # the flat form of before
    trainer.pop("architecture_options")
    for sae in state["identity"]["saes"].values():  # every architecture's settings, flat
        sae.update(jumprelu_bandwidth=0.05, jumprelu_init_threshold=0.0, l0_target=0.0,
                   matryoshka_prefixes=[], threshold_momentum=0.9)  # fmt: skip
    metadata["state"] = json_module.dumps(state)
    save_file(tensors, str(state_file), metadata=metadata)
    before = (tmp_path / "old" / "sae_weights.safetensors").read_bytes()
    run_training(job)  # finished: nothing to train, and no "other settings" refusal
    assert (tmp_path / "old" / "sae_weights.safetensors").read_bytes() == before
    trainer["aux_coef"] = 0.5  # a real difference is still refused
    metadata["state"] = json_module.dumps(state)
    save_file(tensors, str(state_file), metadata=metadata)
    with pytest.raises(SaeguardError, match="other settings"):
        run_training(job)

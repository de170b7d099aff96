"""Data-parallel training under torchrun: two gloo processes train what one process trains.

The launches go through ``python -m torch.distributed.run`` (torchrun) exactly as a user would
start them, on the tiny random llama built by the test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saeguard.cli import main
from saeguard.distributed import World
from saeguard.errors import ConfigError
from saeguard.sae import create_sae, make_sae_config
from saeguard.train.trainer import Trainer, TrainerConfig

REPO = Path(__file__).parents[2]


def _torchrun(argv: list[str], env: dict[str, str] | None = None, nproc: int = 2):
    """Run ``saeguard ARGV`` under torchrun with ``nproc`` CPU processes (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), "-m", "saeguard", *argv]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}  # fmt: skip
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=300)


def _relative_differences(a: Path, b: Path) -> dict[str, float]:
    left, right = (
        load_file(str(a / "sae_weights.safetensors")),
        load_file(str(b / "sae_weights.safetensors")),
    )
    assert set(left) == set(right)
    return {
        key: float((left[key] - right[key]).norm() / right[key].norm().clamp_min(1e-12))
        for key in right
    }


def _same_weights(a: Path, b: Path) -> bool:
    left, right = (
        load_file(str(a / "sae_weights.safetensors")),
        load_file(str(b / "sae_weights.safetensors")),
    )
    return set(left) == set(right) and all(torch.equal(left[k], right[k]) for k in right)


@pytest.fixture(scope="module")
def cache(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small harvest of 12 shards, so that both ranks read several."""
    from tests.conftest import make_text_corpus

    root = tmp_path_factory.mktemp("ddp")
    corpus = make_text_corpus(root / "corpus.txt", n_docs=80)
    out = root / "cache"
    argv = ["harvest", "--model", str(tiny_llama_dir), "--hook", "resid_post.2",
            "--corpus", str(corpus), "--split", "all", "--ctx-len", "16", "--tokens", "3000",
            "--shard-tokens", "256", "--calibration-contexts", "4", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


TRAIN = ["--hook", "resid_post.2", "--arch", "topk", "--k", "4", "--expansion", "2",
         "--threads", "1", "--tokens", "2560", "--batch-tokens", "128", "--buffer-tokens", "512",
         "--eval-tokens", "0", "--checkpoint-every", "4", "--log-every", "5"]  # fmt: skip


def test_two_gloo_ranks_train_the_single_process_sae_and_survive_a_killed_rank(
    cache: Path, tmp_path: Path
) -> None:
    single, ddp, killed = tmp_path / "single", tmp_path / "ddp", tmp_path / "killed"
    assert main(["train", "--acts", str(cache), *TRAIN, "--out", str(single)]) == 0
    done = _torchrun(["train", "--acts", str(cache), *TRAIN, "--out", str(ddp)])
    assert done_ok(done)
    differences = _relative_differences(ddp, single)
    assert max(differences.values()) <= 1e-5, differences
    results = json.loads((ddp / "train_results.json").read_text())
    assert results["world_size"] == 2 and results["device"] == "cpu"
    assert json.loads((ddp / "cfg.json").read_text())["saeguard"]["world_size"] == 2
    assert json.loads(done.stdout)["world_size"] == 2  # rank 0 alone reports

    # Rank 1 dies at its 11th step (rank 0 has checkpointed step 8 by then, or is about to):
    # torchrun ends the job; the same command resumes it from rank 0's checkpoint.
    crash = _torchrun(["train", "--acts", str(cache), *TRAIN, "--out", str(killed)],
                      env={"SAEGUARD_FAULT_KILL_AT": "11", "SAEGUARD_FAULT_RANK": "1"})  # fmt: skip
    assert crash.returncode != 0
    assert not (killed / "sae_weights.safetensors").exists()
    state = json.loads((killed / "checkpoint" / "state.json").read_text())
    assert 4 <= state["step"] < 20
    again = _torchrun(["train", "--acts", str(cache), *TRAIN, "--out", str(killed)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert _same_weights(killed, ddp)
    steps = [
        json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [5, 10, 15, 20]  # no line lost or doubled by the kill

    # The global batch does not depend on the number of ranks: a job killed with two ranks
    # resumes as one process (and the other way round) to the same SAE.
    switched = tmp_path / "switched"
    crash = _torchrun(["train", "--acts", str(cache), *TRAIN, "--out", str(switched)],
                      env={"SAEGUARD_FAULT_KILL_AT": "11", "SAEGUARD_FAULT_RANK": "1"})  # fmt: skip
    assert crash.returncode != 0 and (switched / "checkpoint").is_dir()
    assert main(["train", "--acts", str(cache), *TRAIN, "--out", str(switched)]) == 0
    assert max(_relative_differences(switched, ddp).values()) <= 1e-5
    assert json.loads((switched / "train_results.json").read_text())["world_size"] == 1


def test_two_ranks_share_the_model_forwards_and_mask_the_same_tokens(
    tiny_llama_dir: Path, text_corpus: Path, tmp_path: Path
) -> None:
    """Straight from the model (no cache), with masked regularization: each rank runs the
    model on its own forward batches and the SAE equals one process's."""
    source = ["--model", str(tiny_llama_dir), "--corpus", str(text_corpus), "--split", "all",
              "--ctx-len", "16", "--calibration-contexts", "4", "--mask-prob", "0.1",
              "--batch-size", "4"]  # fmt: skip
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["train", *source, *TRAIN, "--out", str(single)]) == 0
    done = _torchrun(["train", *source, *TRAIN, "--out", str(ddp)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert max(_relative_differences(ddp, single).values()) <= 1e-5
    masked = [json.loads((d / "cfg.json").read_text())["saeguard"]["masking"]["masked_fraction"]
              for d in (single, ddp)]  # fmt: skip
    assert masked[0] == masked[1] > 0


def test_a_two_rank_harvest_writes_the_single_process_cache_and_resumes_per_rank(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tests.conftest import make_text_corpus

    corpus = make_text_corpus(tmp_path / "corpus.txt", n_docs=80)
    argv = ["harvest", "--model", str(tiny_llama_dir), "--hook", "resid_post.1,resid_post.2",
            "--corpus", str(corpus), "--split", "all", "--ctx-len", "16", "--tokens", "2700",
            "--shard-tokens", "256", "--calibration-contexts", "4", "--mask-prob", "0.1",
            "--threads", "1"]  # fmt: skip
    single, ddp, killed = tmp_path / "single", tmp_path / "ddp", tmp_path / "killed"
    assert main([*argv, "--out", str(single)]) == 0
    expected = json.loads((single / "manifest.json").read_text())
    # The last round is cut: the one process's final shard is cut short, and its last shard
    # index is even, so the second rank's shard of that round lies past the end.
    assert len(expected["shards"]) % 2 == 1
    assert done_ok(_torchrun([*argv, "--out", str(ddp)]))
    written = json.loads((ddp / "manifest.json").read_text())
    assert expected.pop("world_size") == 1 and written.pop("world_size") == 2
    assert written == expected  # shard SHA-256s too
    assert sorted(p.name for p in ddp.glob("shard_*")) == sorted(
        p.name for p in single.glob("shard_*")
    )

    # Rank 1 dies at its third failpoint (inside its second shard's write); the re-run keeps
    # every shard the manifest lists and recomputes the rest on the rank that owns them.
    crash = _torchrun([*argv, "--out", str(killed)],
                      env={"SAEGUARD_FAULT_KILL_AT": "3", "SAEGUARD_FAULT_RANK": "1"})  # fmt: skip
    assert crash.returncode != 0
    partial = json.loads((killed / "manifest.json").read_text())
    assert not partial["complete"] and partial["shards"]
    assert done_ok(_torchrun([*argv, "--out", str(killed)]))
    resumed = json.loads((killed / "manifest.json").read_text())
    assert resumed.pop("world_size") == 2 and resumed == expected
    capsys.readouterr()
    assert main(["cache", str(killed), "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True


def done_ok(done: subprocess.CompletedProcess[str]) -> bool:
    assert done.returncode == 0, done.stderr[-3000:]
    return True


def test_the_main_job_runs_under_torchrun_and_trains_the_one_process_sae(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """`saeguard run` under torchrun: harvest and training data-parallel, rank 0 evaluates,
    fits the monitor and reports; the SAE equals the one-process run's."""
    argv = ["run", "--model", str(tiny_llama_dir), "--hook", "resid_post.2", "--quick",
            "--tokens", "40960", "--dtype", "float32", "--threads", "1",
            "--fit-texts", "40", "--calibration-texts", "30", "--id-texts", "20",
            "--per-shift", "12", "--shifts", "typos:0.2"]  # fmt: skip
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*argv, "--out", str(single)]) == 0
    done = _torchrun([*argv, "--out", str(ddp)])
    assert done_ok(done) and done.stdout.count("report:") == 1  # rank 0 alone reports
    assert max(_relative_differences(ddp / "sae", single / "sae").values()) <= 1e-5
    state = json.loads((ddp / "run.json").read_text())
    assert state["world_size"] == 2 and state["steps"]["train"]["results"]["world_size"] == 2
    assert (ddp / "index.html").is_file() and (ddp / "ood" / "ood_benchmark.json").is_file()


def test_what_a_split_batch_would_change_is_refused_in_one_line() -> None:
    two = World(rank=0, size=2)
    cfg = TrainerConfig(tokens=256, batch_tokens=128, buffer_tokens=256)
    batch_topk = {"b": create_sae(make_sae_config("batchtopk", d_in=8, d_sae=16, k=2))}
    with pytest.raises(ConfigError, match="whole batch.*without torchrun"):
        Trainer(batch_topk, cfg, "unused", world=two)
    target = {"j": create_sae(make_sae_config("jumprelu", d_in=8, d_sae=16, k=2, l0_target=4.0))}
    with pytest.raises(ConfigError, match="l0-target"):
        Trainer(target, cfg, "unused", world=two)
    odd = TrainerConfig(tokens=300, batch_tokens=129, buffer_tokens=300)
    topk = {"t": create_sae(make_sae_config("topk", d_in=8, d_sae=16, k=2))}
    with pytest.raises(ConfigError, match="multiple of 2"):
        Trainer(topk, odd, "unused", world=two)
    Trainer(topk, cfg, "unused", world=two)  # a per-token loss splits exactly


def test_commands_that_are_not_data_parallel_refuse_torchrun(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["compare", "a", "b", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(rank 1)" in err and "without torchrun" in err

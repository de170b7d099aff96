"""The generation guard (issue 17): a monitor judges the prompt and the running generation; a
flag stops generation or is recorded. Outcomes are planted through the monitor's threshold."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from saeguard.errors import ConfigError
from saeguard.guard import Guard, GuardConfig, GuardStoppingCriteria, continuation_text
from saeguard.ood import Monitor
from tests.conftest import fit_tiny_monitor, random_texts

ODD = "zebra quilt xylophone " * 4
"""Words the monitor never saw in-distribution: far above the ID prompts' scores."""
GREEDY: dict[str, Any] = {"max_new_tokens": 8, "do_sample": False}


@pytest.fixture(scope="module")
def tiny_monitor(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_tiny_monitor(tiny_llama_dir, tmp_path_factory.mktemp("guard"), 100, 60)


def _monitor(directory: Path, threshold: float | None = None) -> Monitor:
    """A fresh monitor (its thresholds are planted per test), its flag threshold set."""
    monitor = Monitor.load(directory)
    if threshold is not None:
        monitor.thresholds[monitor.cfg.flag_score] = threshold
    return monitor


def _plain(monitor: Monitor, prompt: str, **kwargs: Any) -> list[int]:
    """Token ids of an unguarded ``model.generate`` on the prompt."""
    encoded = monitor.loaded.tokenizer(prompt, return_tensors="pt")
    model: Any = monitor.loaded.model
    return [int(t) for t in model.generate(**encoded, **kwargs)[0]]


def _flag_score(monitor: Monitor, text: str) -> float:
    return monitor.score([text], explain=False)[0].scores[monitor.cfg.flag_score]


# --- (a) a flagged prompt is not generated from -----------------------------------------------
def test_a_flagged_prompt_is_stopped_before_generation(
    tiny_monitor: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = _monitor(tiny_monitor)
    id_prompt = random_texts(1, 5)[0]
    low, high = _flag_score(monitor, id_prompt), _flag_score(monitor, ODD)
    assert high > low, "the planted prompt scores above the ID one"
    monitor.thresholds[monitor.cfg.flag_score] = (low + high) / 2
    guard = Guard(monitor, GuardConfig(policy="stop"))
    fine, stopped = guard.generate([id_prompt, ODD], **GREEDY)

    assert not fine.stopped and fine.new_tokens == 8 and not fine.flagged
    assert stopped.stopped and stopped.stopped_at == 0 and stopped.flagged
    assert stopped.new_tokens == 0 and stopped.continuation == "" and stopped.text == ODD
    encoded = monitor.loaded.tokenizer(ODD)["input_ids"]
    assert stopped.token_ids == list(encoded)
    [verdict] = stopped.verdicts
    assert verdict["at_tokens"] == 0 and verdict["flagged"] is True
    assert verdict["score_name"] == monitor.cfg.flag_score == "fused"
    assert verdict["score"] == pytest.approx(high) and verdict["threshold"] == (low + high) / 2
    assert verdict["explanation"] and {"latent", "reason", "input_contexts"} <= set(
        verdict["explanation"][0]
    )
    json.dumps(stopped.to_json())  # the verdicts are JSON

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("generate ran on a flagged prompt")

    monkeypatch.setattr(monitor.loaded.model, "generate", refuse)
    assert guard.generate(ODD, **GREEDY).stopped  # generate is never called


# --- (b) nothing flags: the output is plain generate's ----------------------------------------
def test_an_unflagged_generation_is_token_for_token_plain_generate(tiny_monitor: Path) -> None:
    monitor = _monitor(tiny_monitor, threshold=float("inf"))
    cfg = GuardConfig(policy="stop", check_every=3, final_check=True)
    for prompt in random_texts(2, 5):
        result = Guard(monitor, cfg).generate(prompt, **GREEDY)
        plain = _plain(monitor, prompt, **GREEDY)
        assert result.token_ids == plain
        assert not result.stopped and result.stopped_at is None and not result.flagged
        assert [v["at_tokens"] for v in result.verdicts] == [0, 3, 6, 8]  # 8: the final check
        assert all(v["flagged"] is False and not v["explanation"] for v in result.verdicts)
        # Each verdict is monitor.score of the text at that point: the last one, of the output.
        assert result.verdicts[-1]["score"] == pytest.approx(_flag_score(monitor, result.text))
    # Scoring draws no random numbers: a seeded sampled generation is unchanged too.
    sampled: dict[str, Any] = {"max_new_tokens": 8, "do_sample": True}
    torch.manual_seed(3)
    guarded = Guard(monitor, cfg).generate(prompt, **sampled)
    torch.manual_seed(3)
    assert guarded.token_ids == _plain(monitor, prompt, **sampled)


class _SentencePieceLike:
    """Decodes as SentencePiece does: "▁" is a space, and a leading space is dropped."""

    pieces = {0: "<s>", 1: "▁the", 2: "▁cat", 3: "▁sat"}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        kept = [self.pieces[i] for i in ids if not (skip_special_tokens and i == 0)]
        return "".join(kept).replace("▁", " ").lstrip(" ")


def test_the_continuation_is_decoded_in_context_keeping_its_leading_space() -> None:
    tokenizer = _SentencePieceLike()
    assert tokenizer.decode([2, 3]) == "cat sat"  # decoded alone, the space is lost
    assert continuation_text(tokenizer, [0, 1], [2, 3]) == " cat sat"
    assert continuation_text(tokenizer, [0, 1], [0]) == ""  # special tokens are dropped


# --- (c) a flag during generation stops it at the first check ---------------------------------
def _rising_prompt(monitor: Monitor, after: int) -> tuple[str, float, float]:
    """An ID prompt whose running text scores higher after ``after`` new tokens than alone."""
    tokenizer = monitor.loaded.tokenizer
    for prompt in random_texts(8, 5):
        ids = tokenizer(prompt)["input_ids"]
        new = _plain(monitor, prompt, max_new_tokens=after, do_sample=False)[len(ids) :]
        before = _flag_score(monitor, prompt)
        running = _flag_score(monitor, prompt + continuation_text(tokenizer, ids, new))
        if running > before:
            return prompt, before, running
    raise AssertionError("no ID prompt whose score rises as it is continued")


def test_check_every_stops_generation_at_the_first_flagged_check(tiny_monitor: Path) -> None:
    monitor = _monitor(tiny_monitor)
    prompt, before, running = _rising_prompt(monitor, after=4)
    monitor.thresholds[monitor.cfg.flag_score] = (before + running) / 2  # prompt passes, 4 flags
    kwargs: dict[str, Any] = {"max_new_tokens": 12, "do_sample": False}
    guard = Guard(monitor, GuardConfig(policy="stop", check_every=4))
    result = guard.generate(prompt, **kwargs)
    plain = _plain(monitor, prompt, **kwargs)
    n_prompt = len(plain) - 12

    assert result.stopped and result.stopped_at == 4 and result.new_tokens == 4
    assert result.token_ids == plain[: n_prompt + 4]  # the same tokens, up to the stop
    assert [(v["at_tokens"], v["flagged"]) for v in result.verdicts] == [(0, False), (4, True)]
    assert result.verdicts[1]["score"] == pytest.approx(running)
    assert result.verdicts[1]["score"] == pytest.approx(_flag_score(monitor, result.text))

    # The same criterion in the user's own generate call.
    encoded = monitor.loaded.tokenizer(prompt, return_tensors="pt")
    criterion = guard.stopping_criteria(encoded["input_ids"].shape[1], [prompt])
    own = guard.model.generate(**encoded, stopping_criteria=[criterion], **kwargs)
    assert own[0].tolist() == result.token_ids
    assert criterion.stopped_at == [4] and criterion.verdicts[0][0]["flagged"] is True


def test_the_criterion_judges_each_row_of_a_batch_on_its_own(tiny_monitor: Path) -> None:
    monitor = _monitor(tiny_monitor, threshold=float("inf"))
    guard = Guard(monitor, GuardConfig(policy="stop", check_every=2))
    criterion = GuardStoppingCriteria(guard, prompt_length=3)
    ids = torch.tensor([[81, 296, 486, 453, 500], [81, 296, 486, 453, 500]])
    assert criterion(ids, None).tolist() == [False, False]  # 2 new tokens: a check, no flag
    monitor.thresholds[monitor.cfg.flag_score] = float("-inf")
    longer = torch.cat([ids, torch.tensor([[406], [453]])], dim=1)
    assert criterion(longer, None).tolist() == [False, False]  # 3 new tokens: no check
    longest = torch.cat([longer, torch.tensor([[438], [438]])], dim=1)
    assert criterion(longest, None).tolist() == [True, True]  # 4: checked, both flag
    assert criterion.stopped_at == [4, 4] and [len(v) for v in criterion.verdicts] == [2, 2]


# --- (d) policy mark records flags and changes nothing ----------------------------------------
def test_policy_mark_records_every_flag_and_leaves_the_output_unchanged(
    tiny_monitor: Path,
) -> None:
    monitor = _monitor(tiny_monitor, threshold=float("-inf"))  # every text flags
    guard = Guard(monitor, GuardConfig(policy="mark", check_every=4))
    for prompt in (random_texts(1, 5)[0], ODD):
        result = guard.generate(prompt, **GREEDY)
        assert result.token_ids == _plain(monitor, prompt, **GREEDY)
        assert not result.stopped and result.stopped_at is None and result.flagged
        assert [(v["at_tokens"], v["flagged"]) for v in result.verdicts] == [
            (0, True),
            (4, True),
            (8, True),
        ]
    assert result.verdicts[0]["explanation"], "the odd prompt's flag is explained"


# --- (e) configurations that cannot work -------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"policy": "halt"}, "policy"),
        ({"check_every": -1}, "check_every must be >= 0"),
        ({"check_every": 2.5}, "whole number"),
        ({"check_every": True}, "whole number"),
        ({"explain": "yes"}, "explain must be True or False"),
    ],
)
def test_bad_guard_configs_fail_early(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GuardConfig(**settings)


def test_the_guard_refuses_what_it_cannot_honour(tiny_monitor: Path) -> None:
    monitor = _monitor(tiny_monitor)
    guard = Guard(monitor)
    with pytest.raises(ConfigError, match="input_ids"):
        guard.generate("the cat", input_ids=torch.tensor([[1, 2]]))
    with pytest.raises(ConfigError, match="num_beams"):
        guard.generate("the cat", num_beams=2, **GREEDY)
    with pytest.raises(ConfigError, match="check_every >= 1"):
        GuardStoppingCriteria(guard, prompt_length=3)
    with pytest.raises(ConfigError, match="one per row"):
        Guard(monitor, GuardConfig(check_every=1)).stopping_criteria(2, ["a", "b", "c"])(
            torch.tensor([[5, 6, 7]]), None
        )
    monitor.thresholds.clear()  # uncalibrated: it would never flag
    with pytest.raises(ConfigError, match="no calibrated threshold"):
        Guard(monitor)


# --- the example script ----------------------------------------------------------------------
def _example() -> Any:
    path = Path(__file__).parents[2] / "examples" / "guard_generation.py"
    spec = importlib.util.spec_from_file_location("guard_generation", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_script_prints_json_and_one_line_errors(
    tiny_monitor: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = _example().main
    argv = ["--monitor", str(tiny_monitor), "--prompt", "the cat and the dog"]
    assert main([*argv, "--check-every", "2", "--max-new-tokens", "4", "--policy", "mark"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 4 and [v["at_tokens"] for v in out["verdicts"]] == [0, 2, 4]
    assert main(["--monitor", str(tmp_path / "nowhere")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err

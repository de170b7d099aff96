"""A generation guard: a fitted OOD monitor judges a model's prompt, and optionally its running
generation every N new tokens, and a flag either stops generation or is recorded on the result.

The guarded model is the monitor's own (``monitor.loaded``): its statistics describe that model's
activations. To guard a model you loaded yourself, load the monitor with it
(``Monitor.load(dir, loaded=...)``).

Every verdict is ``monitor.score`` of one text, so it equals what ``saeguard ood score`` says of
that text. That text is the prompt as given, then the prompt followed by the continuation decoded
so far (special tokens dropped). Each check therefore costs one forward pass of the whole text
checked, beside generation's own passes: up to the hook when the flag score needs only the SAE
and activations, through the logits when it needs the LM (the default fused score does).
Generation's own prefill is not reused: the monitor cuts text into windows of its ``ctx_len``
with its own start token and excludes special tokens, which ``generate``'s input need not match.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from saeguard.configs import validate_literals
from saeguard.errors import ConfigError
from saeguard.ood.monitor import Monitor

log = logging.getLogger(__name__)

Policy = Literal["stop", "mark"]

REFUSED_KWARGS = ("input_ids", "inputs", "attention_mask", "inputs_embeds")
"""``generate`` keywords the guard sets itself (from the prompt text)."""


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """What the guard checks and what a flag does."""

    policy: Policy = "stop"
    """stop: a flagged prompt is not generated from and a flag during generation ends it there;
    mark: generation runs unchanged and the result records the flags."""
    check_every: int = 0
    """Score the running text (prompt + continuation) every this many new tokens, one forward
    pass of the whole text each (0: the prompt only)."""
    final_check: bool = False
    """Also score the finished text when its last tokens came after the last check (one more
    forward pass; its flag is reported, nothing is left to stop)."""
    explain: bool = True
    """Attach the latents that raised each flag (flagged texts only)."""

    def __post_init__(self) -> None:
        validate_literals(self)
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int):
            raise ConfigError(f"check_every must be a whole number, got {self.check_every!r}")
        if self.check_every < 0:
            raise ConfigError(
                f"check_every must be >= 0 (0 checks the prompt only), got {self.check_every}"
            )
        for name in ("final_check", "explain"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")


@dataclass
class GuardedGeneration:
    """One guarded generation: what came out and what the monitor said along the way."""

    prompt: str
    text: str
    """The prompt followed by the continuation (the prompt alone when it was stopped)."""
    continuation: str
    """What generation added (special tokens dropped; empty when the prompt was stopped)."""
    token_ids: list[int]
    """The prompt's token ids as ``generate`` saw them, then the new ones."""
    new_tokens: int
    """How many tokens generation added."""
    stopped: bool = False
    """True when the guard ended generation (policy stop): the prompt or a check flagged."""
    stopped_at: int | None = None
    """New tokens at the check that stopped it (0: the prompt); None when not stopped."""
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    """One per check, in order: {at_tokens, flagged, score_name, score, threshold,
    explanation} (and error / warnings when the monitor gave them)."""

    @property
    def flagged(self) -> bool:
        """Whether any check flagged."""
        return any(v["flagged"] for v in self.verdicts)

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "continuation": self.continuation,
            "new_tokens": self.new_tokens,
            "stopped": self.stopped,
            "stopped_at": self.stopped_at,
            "flagged": self.flagged,
            "verdicts": self.verdicts,
        }


def continuation_text(tokenizer: Any, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text new tokens add after the prompt (special tokens dropped), decoded in context:
    decoded alone, a first token can lose its leading space (SentencePiece)."""
    head = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    full = tokenizer.decode(list(prompt_ids) + list(new_ids), skip_special_tokens=True)
    if full.startswith(head):
        return str(full[len(head) :])
    return str(tokenizer.decode(list(new_ids), skip_special_tokens=True))


class Guard:
    """A monitor watching its own model's generation (see the module docstring for costs)."""

    def __init__(self, monitor: Monitor, cfg: GuardConfig | None = None) -> None:
        self.monitor = monitor
        self.cfg = cfg or GuardConfig()
        name = monitor.cfg.flag_score
        if name not in monitor.thresholds:
            raise ConfigError(
                f"the monitor has no calibrated threshold for its flag score {name!r}, so it "
                "would never flag; calibrate it (Monitor.calibrate, or `saeguard ood fit`)"
            )

    @classmethod
    def load(
        cls, monitor_dir: str | Path, cfg: GuardConfig | None = None, **load_kwargs: Any
    ) -> Guard:
        """A guard on the monitor in ``monitor_dir`` (``load_kwargs`` go to ``Monitor.load``)."""
        return cls(Monitor.load(monitor_dir, **load_kwargs), cfg)

    @property
    def model(self) -> Any:
        """The guarded model: the monitor's own."""
        return self.monitor.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.monitor.loaded.tokenizer

    def judge(self, texts: Sequence[str], at_tokens: Sequence[int]) -> list[dict[str, Any]]:
        """The monitor's verdict on each text (one ``monitor.score`` call: one forward pass of
        each text), tagged with the new-token count it was taken at."""
        name = self.monitor.cfg.flag_score
        results = self.monitor.score(list(texts), explain=self.cfg.explain)
        verdicts = []
        for result, at in zip(results, at_tokens, strict=True):
            verdict: dict[str, Any] = {
                "at_tokens": int(at),
                "flagged": result.flagged,
                "score_name": name,
                "score": result.scores.get(name),
                "threshold": self.monitor.thresholds[name],
                "explanation": result.to_json().get("explanation", []),
            }
            if result.error is not None:
                verdict["error"] = result.error
                log.warning("guard: text at %d new tokens not scored: %s", at, result.error)
            if result.warnings:
                verdict["warnings"] = list(result.warnings)
            if result.flagged:
                log.info(
                    "guard: flagged at %d new tokens (%s %.4g > %.4g)",
                    at, name, verdict["score"], verdict["threshold"],
                )  # fmt: skip
            verdicts.append(verdict)
        return verdicts

    def stopping_criteria(
        self, prompt_length: int, prompts: Sequence[str] | None = None
    ) -> GuardStoppingCriteria:
        """A stopping criterion for your own ``model.generate`` call on input ids of
        ``prompt_length`` tokens (see :class:`GuardStoppingCriteria`)."""
        return GuardStoppingCriteria(self, prompt_length, prompts)

    @overload
    def generate(self, prompt: str, **generate_kwargs: Any) -> GuardedGeneration: ...

    @overload
    def generate(
        self, prompt: Sequence[str], **generate_kwargs: Any
    ) -> list[GuardedGeneration]: ...

    def generate(
        self, prompt: str | Sequence[str], **generate_kwargs: Any
    ) -> GuardedGeneration | list[GuardedGeneration]:
        """Generate from the prompt under the guard: the prompt is scored first (one forward
        pass), then generation runs with ``generate_kwargs`` (e.g. ``max_new_tokens``,
        ``do_sample``) and, with ``check_every``, a :class:`GuardStoppingCriteria` beside any
        stopping criteria given. A list of prompts is generated one prompt at a time."""
        if not isinstance(prompt, str):
            return [self.generate(p, **generate_kwargs) for p in prompt]
        given = [k for k in REFUSED_KWARGS if k in generate_kwargs]
        if given:
            raise ConfigError(
                f"the guard tokenises the prompt itself; drop {', '.join(given)} and pass the "
                "prompt text"
            )
        for name in ("num_beams", "num_return_sequences"):
            if int(generate_kwargs.get(name) or 1) != 1:
                raise ConfigError(
                    f"{name}={generate_kwargs[name]}: the guard follows one sequence per prompt; "
                    "use the default of 1"
                )
        encoded = self.tokenizer(prompt, return_tensors="pt")
        prompt_ids = [int(t) for t in encoded["input_ids"][0]]
        if not prompt_ids:
            raise ConfigError("empty prompt: the tokenizer gives no tokens to generate from")
        verdicts = self.judge([prompt], [0])
        if verdicts[0]["flagged"] and self.cfg.policy == "stop":
            return GuardedGeneration(
                prompt=prompt, text=prompt, continuation="", token_ids=prompt_ids, new_tokens=0,
                stopped=True, stopped_at=0, verdicts=verdicts,
            )  # fmt: skip
        criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
        guard_criterion = None
        if self.cfg.check_every > 0:
            guard_criterion = self.stopping_criteria(len(prompt_ids), [prompt])
            criteria.append(guard_criterion)
        device = self.monitor.loaded.device
        mask = encoded.get("attention_mask")
        output = self.model.generate(
            input_ids=encoded["input_ids"].to(device),
            attention_mask=mask.to(device) if mask is not None else None,
            stopping_criteria=criteria,
            **generate_kwargs,
        )
        sequence = [int(t) for t in getattr(output, "sequences", output)[0]]
        new_ids = sequence[len(prompt_ids) :]
        continuation = continuation_text(self.tokenizer, prompt_ids, new_ids)
        stopped_at, last_checked = None, 0
        if guard_criterion is not None and guard_criterion.verdicts:  # called at least once
            verdicts += guard_criterion.verdicts[0]
            stopped_at = guard_criterion.stopped_at[0]
            last_checked = guard_criterion.last_checked[0]
        if self.cfg.final_check and len(new_ids) > last_checked:
            verdicts += self.judge([prompt + continuation], [len(new_ids)])
        return GuardedGeneration(
            prompt=prompt,
            text=prompt + continuation,
            continuation=continuation,
            token_ids=sequence,
            new_tokens=len(new_ids),
            stopped=stopped_at is not None,
            stopped_at=stopped_at,
            verdicts=verdicts,
        )


class GuardStoppingCriteria(StoppingCriteria):
    """Scores each sequence's running text at the first step on or after every ``check_every``
    new tokens (one forward pass of the whole text per sequence checked); under policy stop a
    flag ends that sequence there, under mark it is only recorded.

    Pass it to ``model.generate(input_ids, ..., stopping_criteria=[criterion])`` with
    ``prompt_length = input_ids.shape[1]``; one criterion serves one ``generate`` call. The
    running text is ``prompts[row]`` (or, without ``prompts``, the decoded prompt ids, special
    tokens dropped) followed by the continuation decoded in context. It does not score the prompt
    itself: :meth:`Guard.generate` does that before generating. Sequences ended by EOS are not
    scored again while their text stays the same.
    """

    def __init__(
        self, guard: Guard, prompt_length: int, prompts: Sequence[str] | None = None
    ) -> None:
        if guard.cfg.check_every < 1:
            raise ConfigError(
                "a guard stopping criterion needs check_every >= 1 (0 checks only the prompt, "
                "which Guard.generate scores before generating)"
            )
        if prompt_length < 0:
            raise ConfigError(f"prompt_length must be >= 0, got {prompt_length}")
        self.guard = guard
        self.prompt_length = prompt_length
        self.prompts = list(prompts) if prompts is not None else None
        self.verdicts: list[list[dict[str, Any]]] = []
        """Per sequence, the verdicts of its checks in order."""
        self.stopped_at: list[int | None] = []
        """Per sequence, the new-token count at which a flag stopped it (None: not stopped)."""
        self.last_checked: list[int] = []
        """Per sequence, the new-token count of its last check (0: none yet)."""
        self._next_check = guard.cfg.check_every
        self._last_text: list[str | None] = []

    def __call__(
        self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any
    ) -> torch.BoolTensor:
        rows, length = int(input_ids.shape[0]), int(input_ids.shape[1])
        if not self.verdicts:
            if self.prompts is not None and len(self.prompts) != rows:
                raise ConfigError(
                    f"{len(self.prompts)} prompt text(s) for {rows} sequences; give one per row "
                    "of input_ids (beam search and several return sequences are not supported)"
                )
            self.verdicts = [[] for _ in range(rows)]
            self.stopped_at = [None] * rows
            self.last_checked = [0] * rows
            self._last_text = [None] * rows
        n_new = length - self.prompt_length
        if n_new >= self._next_check:
            every = self.guard.cfg.check_every
            self._next_check = (n_new // every + 1) * every
            self._check(input_ids, n_new)
        done = [at is not None for at in self.stopped_at]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    def _check(self, input_ids: torch.Tensor, n_new: int) -> None:
        tokenizer = self.guard.tokenizer
        todo: list[tuple[int, str]] = []
        for row in range(int(input_ids.shape[0])):
            if self.stopped_at[row] is not None:
                continue
            ids = [int(t) for t in input_ids[row]]
            prompt_ids, new_ids = ids[: self.prompt_length], ids[self.prompt_length :]
            head = (
                self.prompts[row]
                if self.prompts is not None
                else tokenizer.decode(prompt_ids, skip_special_tokens=True)
            )
            text = head + continuation_text(tokenizer, prompt_ids, new_ids)
            if text == self._last_text[row]:  # ended, or only special tokens since
                self.last_checked[row] = n_new  # the last verdict holds for this text
                continue
            todo.append((row, text))
        if not todo:
            return
        verdicts = self.guard.judge([t for _, t in todo], [n_new] * len(todo))
        for (row, text), verdict in zip(todo, verdicts, strict=True):
            self.verdicts[row].append(verdict)
            self.last_checked[row] = n_new
            self._last_text[row] = text
            if verdict["flagged"] and self.guard.cfg.policy == "stop":
                self.stopped_at[row] = n_new
                log.info("guard: sequence %d stopped at %d new tokens", row, n_new)

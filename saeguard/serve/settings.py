"""What one service process accepts and how it batches: the limits a client can hit."""

from __future__ import annotations

from dataclasses import dataclass

from saeguard.errors import ConfigError


@dataclass(kw_only=True)
class ServiceLimits:
    """Request limits and micro-batching of `saeguard serve` (per worker process)."""

    max_texts_per_request: int = 64
    """Most texts one request may carry (more: 413)."""
    max_chars_per_text: int = 20_000
    """Most characters one text may have (longer: 413); the monitor scores at most its
    max_windows windows of a text anyway."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Most bytes one request body may have (larger: 413, before it is parsed)."""
    max_batch_texts: int = 64
    """Texts gathered from concurrent requests into one scoring call (a request is never split,
    so a batch may exceed this by one request's texts); 64 is the chunk in-process scoring
    reads at once."""
    max_wait_ms: float = 50.0
    """How long the first request of a batch waits for others to join it (small beside a CPU
    forward of seconds; lower it on a GPU, where a batch takes milliseconds)."""
    max_queue_texts: int = 256
    """Texts waiting for the model, all requests together; a request that would exceed it is
    answered 503 with Retry-After."""
    retry_after_s: int = 1
    """The Retry-After a 503 carries (seconds)."""

    def __post_init__(self) -> None:
        for name in (
            "max_texts_per_request",
            "max_chars_per_text",
            "max_body_bytes",
            "max_batch_texts",
            "max_queue_texts",
            "retry_after_s",
        ):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"--max-wait-ms must lie in [0, 10000], got {self.max_wait_ms}")
        if self.max_texts_per_request > self.max_queue_texts:
            raise ConfigError(
                f"--max-texts-per-request ({self.max_texts_per_request}) exceeds "
                f"--max-queue-texts ({self.max_queue_texts}): such a request could never be "
                "queued; raise the queue or lower the request limit"
            )

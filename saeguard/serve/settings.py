"""What one service process accepts and how it batches (the limits a client can hit), and the
bearer token it and its clients read."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from saeguard.errors import ConfigError, SaeguardError

log = logging.getLogger(__name__)

TOKEN_ENV = "SAEGUARD_API_TOKEN"
"""Environment variable holding the bearer token (when no --token-file is given)."""
MIN_TOKEN_CHARS = 16
"""A bearer token shorter than this is refused: too easy to guess."""


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


def read_token(token_file: str) -> str | None:
    """The bearer token from ``token_file``, else from $SAEGUARD_API_TOKEN, else None."""
    if token_file:
        path = Path(token_file)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise SaeguardError(f"cannot read --token-file {token_file}: {exc.strerror}") from exc
        try:
            token = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--token-file {token_file} is not UTF-8 text") from exc
        if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s can be read by other users; chmod 600 it", token_file)
        source = f"--token-file {token_file}"
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
        if not token:
            return None
    if not token or len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(
            f"the token in {source} must be one word of at least {MIN_TOKEN_CHARS} characters "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return token

"""The client of `saeguard serve`: what `saeguard ood score --url` uses.

Texts go in requests of at most the service's ``max_texts_per_request`` (read from
``/v1/info``); a text over its ``max_chars_per_text`` gets an error row without being sent;
a 503 is retried after its Retry-After, a few times. The rows are those local scoring prints
(``index`` = position in the input). Standard library only (``urllib``)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from saeguard.errors import ConfigError, SaeguardError

log = logging.getLogger(__name__)

RETRIES_ON_BUSY = 5
"""How many times a 503 (queue full) is retried before giving up."""


class ServiceClient:
    """Talks to one `saeguard serve` at ``url`` (``http://host:port``)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 600.0) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"--url must be http://HOST:PORT or https://..., got {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def info(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/info"))

    def score(
        self,
        texts: Sequence[str | bytes],
        explain: bool = True,
        explain_all: bool = False,
        tokens: bool = False,
        with_lm: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Every text's row, in input order, as `saeguard ood score` prints it."""
        limits = self.info()["limits"]
        per_request, max_chars = limits["max_texts_per_request"], limits["max_chars_per_text"]
        rows: list[dict[str, Any] | None] = [None] * len(texts)
        warnings: dict[int, list[str]] = {}
        sendable: list[tuple[int, str]] = []
        for i, raw in enumerate(texts):
            text = _decode(raw, warnings.setdefault(i, []))
            if len(text) > max_chars:
                rows[i] = _error_row(
                    i, f"text of {len(text)} characters is over the service's limit of "
                    f"{max_chars}; score it locally with --monitor",
                )  # fmt: skip
            else:
                sendable.append((i, text))
        options: dict[str, Any] = {"tokens": tokens, "with_lm": with_lm}
        path = "/v1/explain" if explain_all else "/v1/score"
        if not explain_all:
            options["explain"] = explain
        for start in range(0, len(sendable), per_request):
            part = sendable[start : start + per_request]
            answer = self._request("POST", path, {"texts": [t for _, t in part], **options})
            for (i, _), row in zip(part, answer["results"], strict=True):
                rows[i] = {**row, "index": i}
        for i, extra in warnings.items():
            row = rows[i]
            if extra and row is not None:
                row["warnings"] = extra + list(row.get("warnings", []))
        return [row for row in rows if row is not None]

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(RETRIES_ON_BUSY + 1):
            request = urllib.request.Request(self.url + path, data, headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                message = _error_message(exc)
                if exc.code == 503 and attempt < RETRIES_ON_BUSY:
                    wait = float(exc.headers.get("Retry-After") or 1)
                    log.warning("service busy (%s); retrying in %.0f s", message, wait)
                    time.sleep(wait)
                    continue
                hint = {
                    401: "; pass the service's token with --token-file or SAEGUARD_API_TOKEN",
                    404: "; is this a saeguard service?",
                }.get(exc.code, "")
                raise SaeguardError(
                    f"the service at {self.url} answered {exc.code}: {message}{hint}"
                ) from exc
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise SaeguardError(
                    f"cannot reach the service at {self.url} ({reason}); is `saeguard serve` "
                    "running there?"
                ) from exc
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SaeguardError(
                    f"the service at {self.url} sent something that is not JSON ({exc})"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover


def _decode(raw: str | bytes, warnings: list[str]) -> str:
    """Bytes as UTF-8, bad sequences replaced and warned about, as local scoring does."""
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        warnings.append("input was not valid UTF-8: bad bytes became U+FFFD")
        return raw.decode("utf-8", errors="replace")


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read().decode("utf-8"))["error"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
        return str(exc.reason)


def _error_row(index: int, message: str) -> dict[str, Any]:
    return {
        "index": index,
        "scores": {},
        "flagged": None,
        "n_tokens": 0,
        "n_windows": 0,
        "truncated": False,
        "error": message,
        "warnings": [],
    }

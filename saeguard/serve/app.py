"""The FastAPI app of `saeguard serve`: score and explain texts with one monitor.

Endpoints: ``POST /v1/score``, ``POST /v1/explain``, ``GET /v1/info``, ``GET /healthz``,
``GET /metrics`` (Prometheus text), OpenAPI at ``/docs``. Every error is a JSON object
``{"error": ...}`` with its status: 401 (token), 413 (too many texts, too long a text, too big
a body), 422 (malformed request), 503 (queue full, with Retry-After). No endpoint reads or
writes a path a client gives: requests carry texts only.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from saeguard import __version__
from saeguard.ood.monitor import Monitor
from saeguard.report.site_links import add_latent_pages
from saeguard.serve.batching import MicroBatcher, QueueFullError, ScoreOptions
from saeguard.serve.live import live_page
from saeguard.serve.metrics import ServiceMetrics
from saeguard.serve.settings import TOKEN_ENV, ServiceLimits

log = logging.getLogger(__name__)

SPEC_ENV = "SAEGUARD_SERVE_SPEC"
"""Environment variable through which `saeguard serve --workers N` hands each worker process
its settings (JSON: monitor, device, limits)."""
BEARER = HTTPBearer(auto_error=False)
"""Reads ``Authorization: Bearer ...`` (module-level: FastAPI resolves the string annotations
of the endpoints against the module's names)."""
SITE_ROUTE = "/browse"
"""Where a served browse site's pages live."""
ROUTES = ("/v1/score", "/v1/explain", "/v1/info", "/healthz", "/metrics", "/live")
"""The paths metrics are labelled with (anything else counts as ``other``)."""


# --- schemas -------------------------------------------------------------------------------
class ScoreRequest(BaseModel):
    """Texts to score, and what to return besides the scores."""

    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[str] = Field(min_length=1, description="The texts, in order.")
    explain: bool = Field(True, description="Explain the flagged texts.")
    explain_all: bool = Field(False, description="Explain every text, flagged or not.")
    tokens: bool = Field(False, description="Add every token's own scores and latents.")
    with_lm: bool | None = Field(
        None, description="Compute the LM baselines (default: when the flag score needs them)."
    )


class ExplainRequest(BaseModel):
    """Texts to explain: each gets its top fallacious latents, flagged or not."""

    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[str] = Field(min_length=1, description="The texts, in order.")
    tokens: bool = Field(False, description="Add every token's own scores and latents.")
    with_lm: bool | None = Field(None, description="As in /v1/score.")


class TextResult(BaseModel):
    """One text's verdict: the rows `saeguard ood score` prints."""

    index: int = Field(description="Position of the text in the request.")
    scores: dict[str, float] = Field(description="Every score (the fused score first).")
    flagged: bool | None = Field(description="None when uncalibrated or unscorable.")
    n_tokens: int
    n_windows: int
    truncated: bool
    error: str | None = Field(description="Why the text could not be scored (e.g. empty).")
    warnings: list[str]
    explanation: list[dict[str, Any]] | None = Field(
        None, description="Top fallacious latents: where they fired, ID rate, range, contexts."
    )
    p_values: dict[str, float] | None = Field(None, description="The fused score's components.")
    tokens: list[dict[str, Any]] | None = Field(None, description="Per-token scores.")


class ScoreResponse(BaseModel):
    """Every text's result, with the flag the monitor raises and its threshold."""

    flag_score: str
    threshold: float | None = Field(description="The flag score's calibrated threshold.")
    target_fpr: float | None = Field(description="The false-positive rate it is calibrated for.")
    results: list[TextResult]


class ErrorResponse(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "Missing or wrong bearer token.",
        413: "Too many texts, too long a text, or too big a body.",
        422: "Malformed request.",
        503: "The queue is full: retry after Retry-After seconds.",
    }.items()
}


# --- the app ---------------------------------------------------------------------------------
def create_app(
    monitor: Monitor | Callable[[], Monitor],
    limits: ServiceLimits | None = None,
    token: str | None = None,
    site: str | Path | None = None,
) -> FastAPI:
    """The service around ``monitor`` (or a function that loads it at start-up: each worker
    process then loads its own). With ``token`` every endpoint but ``/healthz``, the docs and
    the static pages needs ``Authorization: Bearer <token>``. With ``site`` (a `saeguard
    browse` folder) its pages are served under ``/browse/`` and explained latents link there."""
    limits = limits or ServiceLimits()
    metrics = ServiceMetrics()
    state: dict[str, Any] = {}
    site_files = site_listing(Path(site)) if site else {}
    pages = SITE_ROUTE + "/" if site_files else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = monitor if isinstance(monitor, Monitor) else monitor()
        state["monitor"] = loaded

        def score(texts: list[str | bytes], options: ScoreOptions) -> list[Any]:
            return loaded.score(
                texts,
                with_lm=options.with_lm,
                explain=options.explain,
                explain_all=options.explain_all,
                tokens=options.tokens,
            )

        batcher = MicroBatcher(score, limits, metrics.observer())
        batcher.start()
        state["batcher"] = batcher
        log.info("serving the monitor of %s at %s", loaded.loaded.name, loaded.hook)
        yield
        await batcher.stop()  # requests already queued are answered first

    app = FastAPI(
        title="saeguard monitor",
        version=__version__,
        description="Out-of-distribution scores of texts by a saeguard monitor (SAE latents, "
        "reconstruction error, activation and LM baselines, their fused score), with the "
        "latents and tokens that explain each alarm.",
        lifespan=lifespan,
    )
    expected = token.encode() if token else None

    def authorised(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    ) -> None:
        if expected is None:
            return
        given = (credentials.credentials if credentials else "").encode()
        if not hmac.compare_digest(given, expected):  # constant time
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
            f"{e.get('msg', 'invalid')}"
            for e in exc.errors()
        ]
        return JSONResponse({"error": "invalid request: " + "; ".join(problems[:5])}, 422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request to %s failed", request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)  # inside `measure`: counted

    @app.middleware("http")
    async def measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.url.path if request.url.path in ROUTES else "other"
        metrics.record_request(route, response.status_code, time.perf_counter() - started)
        return response

    async def run(texts: list[str], options: ScoreOptions) -> JSONResponse:
        _check_limits(texts, limits)
        try:
            results = await state["batcher"].submit([_as_input(t) for t in texts], options)
        except QueueFullError as exc:
            raise HTTPException(
                503,
                f"the service is busy ({exc}); retry after {limits.retry_after_s} s",
                headers={"Retry-After": str(limits.retry_after_s)},
            ) from exc
        monitor_now: Monitor = state["monitor"]
        rows = [{**r.to_json(), "index": i} for i, r in enumerate(results)]
        metrics.record_results(rows)
        if pages:
            add_latent_pages(rows, pages)
        name = monitor_now.cfg.flag_score
        return JSONResponse(
            {
                "flag_score": name,
                "threshold": monitor_now.thresholds.get(name),
                "target_fpr": monitor_now.calibration.get("target_fpr"),
                "results": rows,
            }
        )

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses=ERRORS,
        dependencies=[Depends(authorised)],
        summary="Score texts: every score, the flag, and explanations of the flagged ones.",
    )
    async def score_texts(request: ScoreRequest) -> JSONResponse:
        options = ScoreOptions(
            explain=request.explain or request.explain_all,
            explain_all=request.explain_all,
            tokens=request.tokens,
            with_lm=request.with_lm,
        )
        return await run(request.texts, options)

    @app.post(
        "/v1/explain",
        response_model=ScoreResponse,
        responses=ERRORS,
        dependencies=[Depends(authorised)],
        summary="Score texts and explain every one of them, flagged or not.",
    )
    async def explain_texts(request: ExplainRequest) -> JSONResponse:
        options = ScoreOptions(explain_all=True, tokens=request.tokens, with_lm=request.with_lm)
        return await run(request.texts, options)

    @app.get(
        "/v1/info",
        responses=ERRORS,
        dependencies=[Depends(authorised)],
        summary="The model, hook, SAE, flag score, threshold, versions and request limits.",
    )
    async def info() -> dict[str, Any]:
        return describe(state["monitor"], limits)

    @app.get("/healthz", summary="Whether the monitor is loaded and the batcher running.")
    async def healthz() -> JSONResponse:
        batcher: MicroBatcher | None = state.get("batcher")
        if batcher is None:
            return JSONResponse({"status": "starting"}, 503)
        return JSONResponse(
            {"status": "ok", "queued_texts": batcher.queued_texts, "busy": batcher.busy}
        )

    @app.get(
        "/metrics",
        dependencies=[Depends(authorised)],
        summary="Prometheus metrics of this worker process.",
    )
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)  # browsers ask; an empty answer, not a 404

    @app.get("/live", response_class=HTMLResponse, summary="Paste a text, see its latents.")
    async def live() -> HTMLResponse:
        return HTMLResponse(live_page(pages))

    if site_files:

        @app.get(SITE_ROUTE + "/{name:path}", summary="The browse site's static pages.")
        async def browse(name: str) -> Response:
            path = site_files.get(name or "index.html")  # only files listed at start-up
            if path is None:
                raise HTTPException(404, f"no page {name!r} in the site")
            return FileResponse(path)

    return app


def site_listing(site: Path) -> dict[str, Path]:
    """Every regular file of a `saeguard browse` site by its relative path (symbolic links and
    anything outside the folder left out): the only files ``/browse/`` ever reads, so a
    request's path is a key to look up, never a path to open."""
    root = site.resolve()
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        relative = path.relative_to(root).as_posix()
        files[relative] = path
    return files


def describe(monitor: Monitor, limits: ServiceLimits) -> dict[str, Any]:
    """What ``/v1/info`` says."""
    from saeguard.ood.scores import SCORE_VERSIONS
    from saeguard.ood.storage import FORMAT_VERSION

    name = monitor.cfg.flag_score
    sae = monitor.sae.cfg
    return {
        "saeguard_version": __version__,
        "monitor_format_version": FORMAT_VERSION,
        "model": monitor.model_info.get("name"),
        "model_fingerprint": monitor.model_info.get("fingerprint"),
        "adapter": monitor.model_info.get("adapter") or None,
        "hook": monitor.hook,
        "sae": {
            "architecture": monitor.sae.architecture,
            "d_in": int(sae.d_in),
            "d_sae": int(sae.d_sae),
        },
        "flag_score": name,
        "threshold": monitor.thresholds.get(name),
        "target_fpr": monitor.calibration.get("target_fpr"),
        "calibrated": bool(monitor.thresholds),
        "needs_lm": monitor.needs_lm,
        "fused_components": monitor.fusion.components if monitor.fusion else [],
        "score_versions": SCORE_VERSIONS,
        "ctx_len": monitor.ctx_len,
        "max_windows": monitor.cfg.max_windows,
        "device": str(monitor.device),
        "limits": {
            "max_texts_per_request": limits.max_texts_per_request,
            "max_chars_per_text": limits.max_chars_per_text,
            "max_body_bytes": limits.max_body_bytes,
            "max_batch_texts": limits.max_batch_texts,
            "max_wait_ms": limits.max_wait_ms,
            "max_queue_texts": limits.max_queue_texts,
        },
    }


def _check_limits(texts: list[str], limits: ServiceLimits) -> None:
    if len(texts) > limits.max_texts_per_request:
        raise HTTPException(
            413,
            f"{len(texts)} texts in one request; the limit is {limits.max_texts_per_request} "
            "(send several requests)",
        )
    for i, text in enumerate(texts):
        if len(text) > limits.max_chars_per_text:
            raise HTTPException(
                413,
                f"text {i} has {len(text)} characters; the limit is {limits.max_chars_per_text}",
            )


def _as_input(text: str) -> str | bytes:
    """A text as the monitor takes it: lone surrogates (valid JSON escapes, not valid UTF-8)
    go in as bytes, so the monitor replaces them and warns, as it does for a file's bad bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")
    return text


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413 before anything parses it (by its
    Content-Length, or by counting a chunked body as it arrives)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send, f"a body of {declared.decode(errors='replace')} bytes")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send, f"a body over {self.limit} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    async def _refuse(self, send: Any, what: str) -> None:
        payload = json.dumps(
            {"error": f"{what}; the limit is {self.limit} bytes (send fewer texts per request)"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _replay(messages: list[dict[str, Any]], then: Any = None) -> Any:
    """A receive that gives ``messages`` first, then what ``then`` receives."""
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        result: dict[str, Any] = await then()
        return result

    return receive


def app_from_environment() -> Any:
    """The app of one worker of `saeguard serve --workers N` (uvicorn imports this factory in
    each worker process; each loads the monitor once at start-up)."""
    import torch

    from saeguard.devices import resolve_device

    spec = json.loads(os.environ[SPEC_ENV])
    limits = ServiceLimits(**spec["limits"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))

    def load() -> Monitor:
        return Monitor.load(spec["monitor"], device=resolve_device(spec["device"]))

    return create_app(load, limits, os.environ.get(TOKEN_ENV) or None, spec.get("site") or None)

"""`saeguard serve`: the monitor as a network service under uvicorn.

Start-up checks everything before it listens: the device, the token (a non-loopback address
needs one), the port, and the monitor directory (loaded once, so a bad one fails in one line).
One worker serves with the monitor it loaded; ``--workers N`` starts N uvicorn worker processes
that each load the monitor once (docs/serve.md says how that meets micro-batching).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from saeguard.configs import validate_literals
from saeguard.devices import check_device_name, resolve_device
from saeguard.errors import ConfigError, SaeguardError
from saeguard.serve.settings import ServiceLimits, read_token

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ServeConfig:
    """`saeguard serve`: which monitor, where it listens, who may call it, and its limits."""

    monitor: str
    """Monitor directory from `saeguard ood fit`."""
    host: str = "127.0.0.1"
    """Address to listen on. Anything but a loopback address needs a token."""
    port: int = 8000
    """TCP port to listen on."""
    token_file: str = ""
    """File holding the bearer token clients must send (Authorization: Bearer ...); without
    it the token comes from the SAEGUARD_API_TOKEN environment variable, if set."""
    workers: int = 1
    """Worker processes (each loads the model once and micro-batches its own requests)."""
    device: str = "auto"
    """Torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under
    torchrun each process takes the GPU of its local rank. Every worker loads onto it."""
    graceful_timeout_s: float = 30.0
    """On shutdown (Ctrl-C, SIGTERM), how long requests in flight may take to finish."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """uvicorn's log level (info logs every request)."""
    site: str = ""
    """A feature-browser site from `saeguard browse`, served under /browse/ (no token needed
    for its static pages: anyone who reaches the port can read them); explained latents then
    link to their pages there, and /live links to them too."""
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    """Request limits and micro-batching."""

    def __post_init__(self) -> None:
        validate_literals(self)
        check_device_name(self.device)
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must lie in 1..65535, got {self.port}")
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"--workers must lie in 1..64, got {self.workers}")
        if self.graceful_timeout_s < 0:
            raise ConfigError(f"--graceful-timeout-s must be >= 0, got {self.graceful_timeout_s}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address


def check_port(host: str, port: int) -> None:
    """Fail in one line when ``host:port`` cannot be listened on (in use, no such address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SaeguardError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port "
                "or --host"
            ) from exc


def serve(cfg: ServeConfig) -> None:
    """Check the settings, load the monitor, and serve until interrupted."""
    import uvicorn

    from saeguard.ood.monitor import Monitor
    from saeguard.serve.app import SPEC_ENV, create_app
    from saeguard.serve.settings import TOKEN_ENV

    device = resolve_device(cfg.device)
    token = read_token(cfg.token_file)
    if token is None and not is_loopback(cfg.host):
        raise ConfigError(
            f"--host {cfg.host} is reachable from other machines: give a bearer token with "
            f"--token-file FILE or ${TOKEN_ENV}, or listen on 127.0.0.1"
        )
    check_port(cfg.host, cfg.port)
    site = None
    if cfg.site:
        from saeguard.jobs.ood import site_prefix

        if cfg.site.startswith(("http://", "https://")):
            raise ConfigError("--site of `saeguard serve` is a folder from `saeguard browse`")
        site_prefix(cfg.site)  # checks that it is such a site
        site = str(Path(cfg.site).resolve())
    monitor = Monitor.load(cfg.monitor, device=device)  # a bad directory fails here, in one line
    common = dict(
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        timeout_graceful_shutdown=cfg.graceful_timeout_s,
    )
    log.info(
        "serving %s on http://%s:%d (OpenAPI at /docs)%s",
        cfg.monitor, cfg.host, cfg.port, "" if token else " without a token",
    )  # fmt: skip
    if cfg.workers == 1:
        uvicorn.run(create_app(monitor, cfg.limits, token, site), **common)  # type: ignore[arg-type]
        return
    del monitor  # each worker loads its own
    # N workers on one machine share its cores: each gets its share of torch threads unless
    # OMP_NUM_THREADS says otherwise.
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // cfg.workers))
    os.environ[SPEC_ENV] = json.dumps(
        {"monitor": str(Path(cfg.monitor).resolve()), "device": cfg.device,
         "limits": asdict(cfg.limits), "threads": threads, "site": site}
    )  # fmt: skip
    if token:
        os.environ[TOKEN_ENV] = token
    uvicorn.run(
        "saeguard.serve.app:app_from_environment",
        factory=True,
        workers=cfg.workers,
        **common,  # type: ignore[arg-type]
    )

"""`saeguard serve`: a real uvicorn server on a free loopback port around a tiny monitor."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from saeguard.cli import main
from saeguard.ood import Monitor
from saeguard.serve.app import create_app
from saeguard.serve.settings import ServiceLimits
from tests.conftest import fit_tiny_monitor
from tests.conftest import random_texts as _texts

TOKEN = "s3cret-token-for-tests-0123456789"
OUTLIER = "zebra quilt xylophone " * 6


class Server:
    """uvicorn serving ``app`` on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=20)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


def call(
    url: str,
    method: str = "GET",
    body: Any = None,
    token: str | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed JSON or text) of one request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, head, payload = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, head, payload = exc.code, dict(exc.headers), exc.read()
    text = payload.decode()
    try:
        return status, head, json.loads(text)
    except json.JSONDecodeError:
        return status, head, text


@pytest.fixture(scope="module")
def monitor_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_tiny_monitor(tiny_llama_dir, tmp_path_factory.mktemp("serve"), 100, 60)


@pytest.fixture(scope="module")
def monitor(monitor_dir: Path) -> Monitor:
    return Monitor.load(monitor_dir)


@pytest.fixture(scope="module")
def server(monitor: Monitor) -> Iterator[Server]:
    limits = ServiceLimits(max_texts_per_request=4, max_chars_per_text=500, max_body_bytes=4000)
    running = Server(create_app(monitor, limits, TOKEN))
    yield running
    running.stop()


def _same_rows(served: list[dict[str, Any]], local: list[dict[str, Any]]) -> None:
    assert len(served) == len(local)
    for a, b in zip(served, local, strict=True):
        assert a.keys() == b.keys() and a["index"] == b["index"]
        assert a["flagged"] == b["flagged"] and a["error"] == b["error"]
        assert a["scores"].keys() == b["scores"].keys()
        for name, value in b["scores"].items():
            assert a["scores"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
        latents = [e["latent"] for e in b.get("explanation", [])]
        assert [e["latent"] for e in a.get("explanation", [])] == latents


def test_score_and_explain_round_trip_equals_monitor_score(
    server: Server, monitor: Monitor
) -> None:
    texts = [*_texts(2, 11), OUTLIER, ""]
    status, _, answer = call(server.url + "/v1/score", "POST", {"texts": texts}, TOKEN)
    assert status == 200, answer
    local = [{**r.to_json(), "index": i} for i, r in enumerate(monitor.score(texts))]
    _same_rows(answer["results"], local)
    assert answer["flag_score"] == monitor.cfg.flag_score
    assert answer["threshold"] == pytest.approx(monitor.thresholds[monitor.cfg.flag_score])
    assert answer["results"][3]["error"]  # the empty text: an error row, the rest scored
    status, _, explained = call(server.url + "/v1/explain", "POST", {"texts": texts}, TOKEN)
    assert status == 200
    local = [
        {**r.to_json(), "index": i} for i, r in enumerate(monitor.score(texts, explain_all=True))
    ]
    _same_rows(explained["results"], local)
    assert explained["results"][2]["explanation"]  # the outlier's latents, flagged or not
    status, _, tokens = call(
        server.url + "/v1/score", "POST", {"texts": texts[:1], "tokens": True}, TOKEN
    )
    assert status == 200 and len(tokens["results"][0]["tokens"]) == local[0]["n_tokens"]


def test_the_token_is_required_and_compared(server: Server) -> None:
    body = {"texts": ["the cat"]}
    for token in (None, "wrong", TOKEN + "x"):
        status, head, answer = call(server.url + "/v1/score", "POST", body, token)
        assert status == 401 and "token" in answer["error"]
        assert head.get("www-authenticate", head.get("WWW-Authenticate")) == "Bearer"
    assert call(server.url + "/metrics")[0] == 401
    assert call(server.url + "/v1/info")[0] == 401
    assert call(server.url + "/healthz")[0] == 200  # load balancers probe without a token
    status, _, spec = call(server.url + "/openapi.json")  # the docs hold no data
    assert status == 200 and {"/v1/score", "/v1/explain", "/v1/info"} <= set(spec["paths"])
    assert call(server.url + "/docs")[0] == 200
    status, _, info = call(server.url + "/v1/info", token=TOKEN)
    assert status == 200 and info["limits"]["max_texts_per_request"] == 4
    assert info["hook"] and info["sae"]["d_sae"] > 0 and info["flag_score"] == "fused"


@pytest.mark.parametrize(
    ("body", "raw", "status", "words"),
    [
        ({"texts": ["a"] * 5}, None, 413, "5 texts"),
        ({"texts": ["a" * 501]}, None, 413, "501 characters"),
        (None, b'{"texts": ["' + b"a" * 5000 + b'"]}', 413, "limit is 4000 bytes"),
        (None, b"{not json", 422, "invalid request"),
        ({"texts": "the cat"}, None, 422, "texts"),
        ({"texts": []}, None, 422, "texts"),
        ({"texts": [3]}, None, 422, "texts"),
        ({"texts": ["a"], "delete": "/etc"}, None, 422, "delete"),
        ({"text": ["a"]}, None, 422, "texts"),
    ],
)
def test_oversize_and_malformed_requests_get_a_json_error(
    server: Server, body: Any, raw: bytes | None, status: int, words: str
) -> None:
    got, _, answer = call(server.url + "/v1/score", "POST", body, TOKEN, raw)
    assert got == status and words in answer["error"], answer
    assert call(server.url + "/healthz")[0] == 200  # and the service is still up


def test_invalid_utf8_escapes_are_replaced_and_warned_about(server: Server) -> None:
    raw = b'{"texts": ["the cat \\ud800 river"]}'  # valid JSON, not valid UTF-8 text
    status, _, answer = call(server.url + "/v1/score", "POST", raw=raw, token=TOKEN)
    assert status == 200 and answer["results"][0]["scores"]
    assert any("UTF-8" in w for w in answer["results"][0]["warnings"])


def test_metrics_parse_as_prometheus_text(server: Server) -> None:
    call(server.url + "/v1/score", "POST", {"texts": [OUTLIER]}, TOKEN)
    status, head, text = call(server.url + "/metrics", token=TOKEN)
    assert status == 200 and head["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {"saeguard_requests", "saeguard_request_seconds", "saeguard_batch_texts",
                "saeguard_queue_texts", "saeguard_flags", "saeguard_texts"}  # fmt: skip
    assert expected <= set(families)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("saeguard_requests_total", (("route", "/v1/score"), ("status", "200")))] >= 1
    assert samples[("saeguard_batch_texts_count", ())] >= 1
    assert samples[("saeguard_texts_total", (("outcome", "ok"),))] >= 1


def _blocking(monitor: Monitor, started: threading.Event, release: threading.Event) -> None:
    """Make ``monitor.score`` wait for ``release`` (after saying it started)."""
    score = monitor.score

    def slow(*args: Any, **kwargs: Any) -> Any:
        started.set()
        assert release.wait(60)
        return score(*args, **kwargs)

    monitor.score = slow  # type: ignore[method-assign]


def test_a_full_queue_answers_503_with_retry_after_and_shutdown_is_graceful(
    monitor_dir: Path,
) -> None:
    monitor = Monitor.load(monitor_dir)
    started, release = threading.Event(), threading.Event()
    _blocking(monitor, started, release)
    limits = ServiceLimits(max_texts_per_request=2, max_queue_texts=2, max_wait_ms=0)
    server = Server(create_app(monitor, limits))
    answers: dict[str, Any] = {}

    def send(name: str, n: int) -> None:
        answers[name] = call(server.url + "/v1/score", "POST", {"texts": _texts(n, 3)})

    first = threading.Thread(target=send, args=("first", 2))
    first.start()
    assert started.wait(30)  # the first request is in the model
    second = threading.Thread(target=send, args=("second", 2))
    second.start()
    deadline = time.monotonic() + 30
    while call(server.url + "/healthz")[2]["queued_texts"] < 2:  # the second one is queued
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, head, answer = call(server.url + "/v1/score", "POST", {"texts": ["the cat"]})
    assert status == 503 and head["retry-after"] == "1" and "busy" in answer["error"]
    server.server.should_exit = True  # shut down with two requests in flight...
    time.sleep(0.3)
    release.set()
    first.join(60)
    second.join(60)
    server.thread.join(60)
    assert answers["first"][0] == 200 and answers["second"][0] == 200  # ...both finish
    assert len(answers["second"][2]["results"]) == 2 and not server.thread.is_alive()


def test_concurrent_requests_share_a_forward_pass(monitor: Monitor) -> None:
    server = Server(create_app(monitor, ServiceLimits(max_wait_ms=500)))
    try:
        texts = _texts(6, 21)
        results: dict[int, Any] = {}

        def send(i: int) -> None:
            results[i] = call(server.url + "/v1/score", "POST", {"texts": [texts[i]]})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        metrics = call(server.url + "/metrics")[2]
    finally:
        server.stop()
    batches = {
        s.name: s.value
        for f in text_string_to_metric_families(metrics)
        for s in f.samples
        if s.name.startswith("saeguard_batch_texts")
    }
    assert batches["saeguard_batch_texts_sum"] == 6
    assert batches["saeguard_batch_texts_count"] < 6  # some requests were scored together
    alone = monitor.score(texts)
    for i in range(6):  # a text's numbers do not depend on its company beyond float rounding
        assert results[i][0] == 200
        served = results[i][2]["results"][0]
        assert served["index"] == 0 and served["flagged"] == alone[i].flagged
        for name, value in alone[i].scores.items():
            assert served["scores"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_ood_score_url_prints_the_lines_of_local_scoring(
    server: Server, monitor_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    texts = [*_texts(5, 4), OUTLIER, "x" * 600]  # 7 texts: two requests of at most 4
    assert main(["-q", "ood", "score", "--monitor", str(monitor_dir), *texts[:6]]) == 0
    local = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    argv = ["-q", "ood", "score", "--url", server.url, "--token-file", str(token_file), *texts]
    assert main(argv) == 0
    served = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    _same_rows(served[:6], local)
    assert served[6]["index"] == 6 and "over the service's limit" in served[6]["error"]
    # Without the token: one line saying so.
    assert main(["-q", "ood", "score", "--url", server.url, "the cat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "401" in err[0] and "--token-file" in err[0]


def test_start_up_refuses_what_cannot_work_in_one_line(
    monitor_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SAEGUARD_API_TOKEN", raising=False)
    short = tmp_path / "short"
    short.write_text("abc")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [
        (["--monitor", str(monitor_dir), "--host", "0.0.0.0"], "bearer token"),
        (["--monitor", str(tmp_path)], "not a monitor directory"),
        (["--monitor", str(monitor_dir), "--token-file", str(short)], "at least 16"),
        (["--monitor", str(monitor_dir), "--token-file", str(tmp_path / "none")], "cannot read"),
        (["--monitor", str(monitor_dir), "--port", str(busy.getsockname()[1])], "cannot listen"),
        (["--monitor", str(monitor_dir), "--max-texts-per-request", "999"], "could never"),
        (["--monitor", str(monitor_dir), "--port", "70000"], "--port"),
        (["--monitor", str(monitor_dir), "--device", "tpu"], "device"),
    ]
    try:
        for argv, words in cases:
            assert main(["serve", *argv]) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and words in err[0], (argv, err)
    finally:
        busy.close()
    assert main(["ood", "score", "--url", "ftp://x", "the cat"]) == 2
    assert "--url must be" in capsys.readouterr().err
    assert main(["ood", "score", "the cat"]) == 2  # neither a monitor nor a URL
    assert "one of the two" in capsys.readouterr().err


def test_the_serve_command_with_two_workers_serves_and_stops_on_sigterm(
    monitor_dir: Path, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    command = [sys.executable, "-m", "saeguard", "-q", "serve", "--monitor", str(monitor_dir),
               "--port", str(port), "--workers", "2", "--token-file", str(token_file),
               "--log-level", "warning", "--device", "cpu"]  # fmt: skip
    service = subprocess.Popen(
        command, env={**os.environ, "TQDM_DISABLE": "1"}, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while call(url + "/healthz")[0] != 200 if _listening(port) else True:
            assert service.poll() is None and time.monotonic() < deadline, "did not start"
            time.sleep(0.2)
        status, _, answer = call(url + "/v1/score", "POST", {"texts": [OUTLIER]}, TOKEN)
        assert status == 200 and answer["results"][0]["scores"]
        assert call(url + "/v1/score", "POST", {"texts": ["a"]})[0] == 401
    finally:
        service.send_signal(signal.SIGTERM)
        _, err = service.communicate(timeout=60)
    assert service.returncode == 0, err
    assert "Traceback" not in err


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_explained_latents_link_to_their_pages_in_a_browse_site(
    monitor_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from saeguard.report.ood_report import explanation_html

    site = tmp_path / "site"
    site.mkdir()
    for page in ("index.html", "latent.html"):
        (site / page).write_text("<html></html>")
    argv = ["-q", "ood", "score", "--monitor", str(monitor_dir), "--explain-all"]
    assert main([*argv, "--site", str(site), OUTLIER]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["explanation"]
    for latent in row["explanation"]:
        assert latent["page"] == f"{site.resolve().as_uri()}/latent.html?i={latent['latent']}"
    # In the benchmark's examples page the latent's name is a link (escaped).
    linked = {**row["explanation"][0], "page": "../site/latent.html?i=1&'x"}
    example = {"shift": "s", "text": OUTLIER, "scores": row["scores"], "flagged": True,
               "explanation": [linked]}  # fmt: skip
    rendered = explanation_html(example, "fused", 1.0, 1000)
    assert "<a href='../site/latent.html?i=1&amp;&#x27;x'>latent " in rendered
    # A folder that is not a site: one line, before any work.
    assert main([*argv, "--site", str(tmp_path), OUTLIER]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saeguard browse" in err[0]


def test_a_served_site_is_read_only_from_its_listing_and_alarms_link_into_it(
    monitor: Monitor, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    (site / "index.html").write_text("<html>index</html>")
    (site / "latent.html").write_text("<html>latent</html>")
    (site / "data" / "latents_000.js").write_text("window.x = 1;")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    (site / "leak.txt").symlink_to(secret)
    server = Server(create_app(monitor, ServiceLimits(), TOKEN, site))
    try:
        assert call(server.url + "/browse/")[2] == "<html>index</html>"  # no token: static
        assert call(server.url + "/browse/data/latents_000.js")[2] == "window.x = 1;"
        for name in ("leak.txt", "../secret.txt", "%2e%2e/secret.txt", "nothing.html"):
            status, _, answer = call(server.url + "/browse/" + name)
            assert status == 404 and "do not serve" not in json.dumps(answer)
        status, _, answer = call(server.url + "/v1/explain", "POST", {"texts": [OUTLIER]}, TOKEN)
        latents = answer["results"][0]["explanation"]
        assert status == 200 and latents
        assert all(e["page"] == f"/browse/latent.html?i={e['latent']}" for e in latents)
        status, _, live = call(server.url + "/live")
        assert status == 200 and '"/browse/"' in live and "textContent" in live
    finally:
        server.stop()

"""Load test of `saeguard serve` against in-process scoring, in the same run.

Starts `saeguard serve` on a free loopback port in a subprocess (one worker), lets C client
threads send requests of --texts-per-request held-out ID texts for T seconds (or until
--max-requests), and prints latency p50/p95/p99, texts/s, the error count and the mean
micro-batch size (from /metrics). Then stops the service and, in this process, times
`Monitor.score` on exactly the texts the service scored (its own batching: chunks of 64), and
prints the service's throughput as a share of it; then times the same texts in-process in
calls of the service's mean batch size, which splits the gap into what small batches cost and
what the service itself costs. Texts are held-out ID texts cut to --chars characters (by
default only texts at least that long: 94-227 tokens, so about half of them end in a short
second window; --mixed-lengths shows shorter texts too). The goal: zero errors and at least
80% of in-process throughput at C=8.

    python benchmarks/serve_load.py --monitor runs/default/monitor [--clients 8] [--seconds 60]

Loopback only; bounded in time and in requests.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from saeguard.data.shifts import id_split_texts
from saeguard.ood import Monitor


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


def _post(url: str, body: dict[str, Any]) -> int:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            json.loads(response.read())
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--monitor", default="runs/default/monitor", help="Monitor directory.")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients (C).")
    parser.add_argument("--seconds", type=float, default=60.0, help="Load duration (T).")
    parser.add_argument("--max-requests", type=int, default=2000, help="Stop after this many.")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--chars", type=int, default=600, help="Each text cut to this length.")
    parser.add_argument(
        "--mixed-lengths",
        action="store_true",
        help="Also take texts shorter than --chars (default: only texts at least that long, so "
        "every text is about one window and batch padding does not depend on batch size).",
    )
    parser.add_argument("--max-wait-ms", type=float, default=50.0, help="Service batching wait.")
    parser.add_argument("--json", default="", help="Also write the numbers to this file.")
    args = parser.parse_args()

    monitor_dir = str(Path(args.monitor).resolve())
    doc = json.loads((Path(monitor_dir) / "monitor.json").read_text())
    corpus = str(doc.get("config", {}).get("corpus") or "wiki-en")
    candidates = id_split_texts(corpus, "test", 2000, seed=3)
    shortest = 1 if args.mixed_lengths else args.chars
    pool = [t[: args.chars] for t in candidates if len(t.strip()) >= shortest][:400]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "saeguard", "-q", "serve", "--monitor", monitor_dir,
               "--port", str(port), "--log-level", "warning", "--device", "cpu",
               "--max-wait-ms", str(args.max_wait_ms)]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1"}
    service = subprocess.Popen(command, env=env)
    try:
        deadline = time.monotonic() + 300
        while _get(url + "/healthz")[0] != 200:
            if service.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the service did not start (see its error above)")
            time.sleep(0.2)
        for _ in range(3):  # warm-up
            _post(url + "/v1/score", {"texts": pool[:1]})

        lock = threading.Lock()
        sent: list[list[str]] = []
        latencies: list[float] = []
        statuses: list[int] = []
        stop_at = time.monotonic() + args.seconds

        def client() -> None:
            while time.monotonic() < stop_at:
                with lock:
                    if len(sent) >= args.max_requests:
                        return
                    start = len(sent) * args.texts_per_request
                    texts = [pool[(start + j) % len(pool)] for j in range(args.texts_per_request)]
                    sent.append(texts)
                began = time.perf_counter()
                status = _post(url + "/v1/score", {"texts": texts})
                with lock:
                    latencies.append(time.perf_counter() - began)
                    statuses.append(status)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - began
        metrics = _get(url + "/metrics")[1]
    finally:
        service.terminate()
        service.wait(120)

    batches = {
        s.name: s.value
        for f in text_string_to_metric_families(metrics)
        for s in f.samples
        if s.name.startswith(("saeguard_batch_texts", "saeguard_batch_seconds"))
    }
    texts_done = [t for batch in sent for t in batch]
    errors = sum(1 for s in statuses if s != 200)
    service_rate = (len(texts_done) - errors * args.texts_per_request) / elapsed
    ms = np.array(latencies) * 1000

    monitor = Monitor.load(monitor_dir, device="cpu")
    monitor.score(pool[:4])  # warm-up
    began = time.perf_counter()
    monitor.score(texts_done)
    local_rate = len(texts_done) / (time.perf_counter() - began)
    # The same texts in-process in calls of the service's mean batch size: what the service
    # could reach if HTTP and queueing cost nothing (the gap to it is the service's own cost).
    mean_batch = batches.get("saeguard_batch_texts_sum", 0) / max(
        1, batches.get("saeguard_batch_texts_count", 0)
    )
    size = max(1, round(mean_batch))
    began = time.perf_counter()
    for start in range(0, len(texts_done), size):
        monitor.score(texts_done[start : start + size])
    batch_rate = len(texts_done) / (time.perf_counter() - began)

    result = {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "texts_per_request": args.texts_per_request,
        "text_chars": "mixed, at most " + str(args.chars) if args.mixed_lengths else args.chars,
        "requests": len(statuses),
        "texts": len(texts_done),
        "errors": errors,
        "latency_ms": {
            q: round(float(np.percentile(ms, int(q[1:]))), 1) for q in ("p50", "p95", "p99")
        },  # fmt: skip
        "mean_batch_texts": round(
            batches.get("saeguard_batch_texts_sum", 0)
            / max(1, batches.get("saeguard_batch_texts_count", 0)),
            2,
        ),
        "service_texts_per_s": round(service_rate, 2),
        "in_process_texts_per_s": round(local_rate, 2),
        "ratio": round(service_rate / local_rate, 3),
        "in_process_at_batch_size": size,
        "in_process_at_batch_size_texts_per_s": round(batch_rate, 2),
        "ratio_to_same_batch_size": round(service_rate / batch_rate, 3),
        "scoring_busy_share": round(batches.get("saeguard_batch_seconds_sum", 0) / elapsed, 3),
        "in_service_texts_per_scoring_s": round(
            batches.get("saeguard_batch_texts_sum", 0)
            / max(batches.get("saeguard_batch_seconds_sum", 0), 1e-9),
            2,
        ),
    }
    print(json.dumps(result, indent=2))
    print(
        f"service {service_rate:.2f} texts/s = {result['ratio']:.0%} of in-process "
        f"{local_rate:.2f} texts/s at C={args.clients}; p99 {result['latency_ms']['p99']} ms; "
        f"{errors} errors; in-process in calls of {size} texts (the service's mean batch): "
        f"{batch_rate:.2f} texts/s, the service at {service_rate / batch_rate:.0%} of it"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

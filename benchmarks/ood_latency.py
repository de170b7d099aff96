"""OOD monitor latency against the bare model forward up to the hook, in the same run.

Scores a batch of 128-token prompts with a loaded monitor (tokenisation, the forward to the
hook, SAE encode and sparse decode, every SAE score, the Mahalanobis and k-NN baselines and the
explanations of flagged prompts) and times the bare forward up to the hook on exactly the same
token windows. Prints both medians and the monitor's overhead; the goal is at most 25%.

    python benchmarks/ood_latency.py --monitor runs/default/monitor [--prompts 16] [--repeats 5]

The monitor comes from `saeguard run` (or `saeguard ood fit`); prompts are held-out ID texts
(test split of the monitor's corpus) long enough to fill a 128-token window.
"""

from __future__ import annotations

import argparse

import torch
from timing import timed

from saeguard.data.shifts import id_split_texts
from saeguard.data.tokenize import tokenize_documents
from saeguard.models.hooks import run_to_hooks
from saeguard.ood import Monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--monitor", default="runs/default/monitor", help="Monitor directory.")
    parser.add_argument("--prompts", type=int, default=16, help="Prompts per batch.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repetitions (median).")
    parser.add_argument("--threads", type=int, default=0, help="Torch threads (0: default).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    monitor = Monitor.load(args.monitor)
    reader = monitor.reader
    corpus = str(monitor.sae_metadata.get("corpus") or "wiki-en")
    candidates = id_split_texts(corpus, "test", 20 * args.prompts, seed=1)
    ids = tokenize_documents(monitor.loaded.tokenizer, candidates)
    texts = [t for t, i in zip(candidates, ids, strict=True) if len(i) >= reader.room]
    texts = texts[: args.prompts]
    if len(texts) < args.prompts:
        raise SystemExit(f"only {len(texts)} test texts fill a {monitor.ctx_len}-token window")
    windows = [
        reader.windows(i, "head", max_windows=1)[0][0]
        for i in tokenize_documents(monitor.loaded.tokenizer, texts)
    ]
    tokens = torch.tensor(windows, dtype=torch.long)
    model = monitor.loaded.model

    def bare() -> None:
        with torch.inference_mode():
            run_to_hooks(model, tokens, [reader.point])

    def monitored() -> None:
        results = monitor.score(texts, max_windows=1)
        assert all(r.error is None for r in results)

    def monitored_no_explanations() -> None:
        monitor.score(texts, max_windows=1, explain=False)

    t_bare = timed(bare, args.repeats)
    t_monitor = timed(monitored, args.repeats)
    t_plain = timed(monitored_no_explanations, args.repeats)
    flagged = sum(bool(r.flagged) for r in monitor.score(texts, max_windows=1, explain=False))
    n_tokens = tokens.numel()
    print(
        f"batch: {len(texts)} prompts x {tokens.shape[1]} tokens = {n_tokens} tokens; "
        f"torch threads {torch.get_num_threads()}; {flagged} prompt(s) flagged and explained"
    )
    rate = n_tokens / t_bare
    print(f"bare forward to {monitor.hook}:        {t_bare * 1000:8.1f} ms  ({rate:,.0f} tok/s)")
    print(f"monitor.score (with explanations): {t_monitor * 1000:8.1f} ms")
    print(f"monitor.score (no explanations):   {t_plain * 1000:8.1f} ms")
    print(f"overhead over the bare forward: {t_monitor / t_bare - 1:+.1%} "
          f"(without explanations {t_plain / t_bare - 1:+.1%}); goal: at most +25%")  # fmt: skip


if __name__ == "__main__":
    main()

"""OOD monitor latency against the bare model forward, in the same run.

Scores a batch of 128-token prompts with a loaded monitor (tokenisation, the forward, SAE
encode and sparse decode, every SAE score, the Mahalanobis and k-NN baselines, the fused score
and the explanations of flagged prompts) and times the bare model on exactly the same token
windows, two ways: up to the hook (all the SAE scores need) and through to the logits (what
the LM baselines, and a fused score that includes them, need). Prints every median and:

- the monitor **with** the LM scores against the bare forward to the hook and against the bare
  full forward;
- the monitor **without** them (``with_lm=False``: SAE scores and activation baselines; the
  fused score of a monitor fitted with ``--no-fused-with-lm``) against the bare forward to the
  hook. The goal is at most +25% over the bare forward each path needs.

    python benchmarks/ood_latency.py --monitor runs/default/monitor [--prompts 16] [--repeats 5]

The monitor comes from `saeguard run` (or `saeguard ood fit`); prompts are held-out ID texts
(test split of the monitor's corpus) long enough to fill a 128-token window.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

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

    lm_batch = max(1, monitor.cfg.batch_size // 2)  # the reader's batches when it runs the LM

    def bare_full() -> None:  # in the same batches as the monitor's full forwards
        with torch.inference_mode():
            for start in range(0, len(tokens), lm_batch):
                model(input_ids=tokens[start : start + lm_batch], use_cache=False)

    def monitored(with_lm: bool, explain: bool = True) -> Callable[[], None]:
        def step() -> None:
            results = monitor.score(texts, max_windows=1, with_lm=with_lm, explain=explain)
            assert all(r.error is None for r in results)

        return step

    t_bare = timed(bare, args.repeats)
    t_full = timed(bare_full, args.repeats)
    t_lm = timed(monitored(True), args.repeats)
    t_lm_plain = timed(monitored(True, explain=False), args.repeats)
    t_nolm = timed(monitored(False), args.repeats)
    flagged = sum(bool(r.flagged) for r in monitor.score(texts, max_windows=1, explain=False))
    n_tokens = tokens.numel()
    fused = monitor.cfg.fusion_components if monitor.fusion else []
    print(
        f"batch: {len(texts)} prompts x {tokens.shape[1]} tokens = {n_tokens} tokens; "
        f"torch threads {torch.get_num_threads()}; flag score {monitor.cfg.flag_score} "
        f"({len(fused)} components, LM included: {monitor.needs_lm}); {flagged} prompt(s) "
        "flagged and explained"
    )
    rate = n_tokens / t_bare
    print(
        f"bare forward to {monitor.hook}:             {t_bare * 1000:8.1f} ms  ({rate:,.0f} tok/s)"
    )
    print(f"bare full forward (logits):              {t_full * 1000:8.1f} ms")
    print(f"monitor with LM scores (explanations):   {t_lm * 1000:8.1f} ms")
    print(f"monitor with LM scores (no explanations):{t_lm_plain * 1000:8.1f} ms")
    print(f"monitor without LM scores:               {t_nolm * 1000:8.1f} ms")
    print(f"with LM scores: {t_lm / t_full - 1:+.1%} over the bare full forward, "
          f"{t_lm / t_bare - 1:+.1%} over the bare forward to the hook")  # fmt: skip
    print(f"without LM scores: {t_nolm / t_bare - 1:+.1%} over the bare forward to the hook "
          "(goal for each path: at most +25% over the forward it needs)")  # fmt: skip


if __name__ == "__main__":
    main()

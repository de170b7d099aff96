"""The ``saeguard`` command line.

Each sub-command's options are generated from its config dataclass (see
:mod:`saeguard.configs`), so ``--help`` always matches the Python API.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from saeguard import __version__
from saeguard.configs import add_config_arguments, config_from_args
from saeguard.errors import SaeguardError, describe_os_error
from saeguard.fileio import release_output_locks

log = logging.getLogger("saeguard")


def _cmd_harvest(args: argparse.Namespace) -> int:
    from saeguard.jobs.harvest import HarvestConfig, harvest

    cfg = config_from_args(HarvestConfig, args)
    cache = harvest(cfg)
    summary = {
        "out": str(cache.directory),
        "hooks": {h: cache.n_tokens(h) for h in cache.hooks},
        "shards": len(cache.shards),
        "complete": cache.complete,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from saeguard.jobs.train import TrainJobConfig, run_training

    job = config_from_args(TrainJobConfig, args)
    results = run_training(job)
    print(json.dumps(results, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from saeguard.jobs.eval import EvalConfig, run_eval

    cfg = config_from_args(EvalConfig, args)
    document = run_eval(args.sae_dir, cfg)
    out = cfg.out or (f"{cfg.adapter}/eval" if cfg.adapter else args.sae_dir)
    summary = {name: m["value"] for name, m in document["metrics"].items()}
    print(json.dumps({"eval_json": f"{out}/eval.json", "eval_html": f"{out}/eval.html",
                      "complete": document["complete"], "metrics": summary}, indent=2))  # fmt: skip
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from saeguard.jobs.compare import compare

    result = compare(args.directories, args.out, args.metrics, args.seed)
    print(result.terminal)
    if args.markdown:
        print()
        print(result.markdown)
    return 0


def _cmd_study_masking(args: argparse.Namespace) -> int:
    from saeguard.jobs.studies import MaskingStudyConfig, run_study

    cfg = config_from_args(MaskingStudyConfig, args)
    document = run_study(cfg)
    print(f"{cfg.out}/study.md, {cfg.out}/study.html, {cfg.out}/study.json")
    print("finding:", document["finding"])
    return 0


def _cmd_ood_fit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from saeguard.fileio import check_output_directory
    from saeguard.ood import Monitor, MonitorConfig
    from saeguard.ood.storage import MONITOR_ENTRIES

    cfg = config_from_args(MonitorConfig, args)
    check_output_directory(Path(args.out), MONITOR_ENTRIES)  # before the work, not after
    monitor = Monitor.fit(args.sae_dir, cfg, model=args.model, corpus=args.corpus)
    if args.calibrate:
        monitor.calibrate(corpus=args.corpus)
    monitor.save(args.out)
    summary = {
        "monitor": args.out,
        "id_tokens": monitor.stats.n_tokens,
        "id_texts": monitor.stats.n_texts,
        "flag_score": cfg.flag_score,
        "threshold": monitor.thresholds.get(cfg.flag_score),
        "calibration": monitor.calibration,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _read_texts(args: argparse.Namespace) -> list[str | bytes]:
    """Texts from the arguments, else from --file (or stdin), as raw bytes when read from a file
    so that invalid UTF-8 is reported per text instead of failing the whole input."""
    if args.texts:
        return list(args.texts)
    data = sys.stdin.buffer.read() if args.file in ("", "-") else _read_bytes(args.file)
    if args.input_format == "whole":
        return [data]
    if args.input_format == "jsonl":
        texts: list[str | bytes] = []
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                texts.append(str(record["text"]) if isinstance(record, dict) else str(record))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as exc:
                raise SaeguardError(
                    f"line {number} of the input is not a JSON object with a 'text' field ({exc})"
                ) from exc
        return texts
    return [line for line in data.splitlines() if line.strip()]


def _read_bytes(path: str) -> bytes:
    from pathlib import Path

    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SaeguardError(f"cannot read {path}: {exc.strerror}") from exc


def _cmd_ood_score(args: argparse.Namespace) -> int:
    from saeguard.ood import Monitor

    texts = _read_texts(args)  # bad input fails before the model loads
    if not texts:
        raise SaeguardError("no text to score: pass texts as arguments, --file PATH, or stdin")
    monitor = Monitor.load(args.monitor, model=args.model, adapter=args.adapter)
    results = monitor.score(
        texts,
        with_lm=args.with_lm,
        explain=args.explain,
        explain_all=args.explain_all,
        progress="score" if len(texts) > 16 else None,
    )
    for result in results:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    return 0


def _cmd_ood_benchmark(args: argparse.Namespace) -> int:
    from saeguard.jobs.ood import OodBenchmarkConfig, run_benchmark

    cfg = config_from_args(OodBenchmarkConfig, args)
    document = run_benchmark(args.monitor, args.out, cfg)
    from saeguard.report.ood_report import summary_sentences

    print(f"{args.out}/ood_benchmark.json, ood_benchmark.md, ood_report.html, examples.html")
    cal = document["calibration"]
    print(f"measured FPR {cal['measured_fpr']:.3f} (target {cal['target_fpr']})")
    for sentence in summary_sentences(document):
        print(sentence)
    return 0


def _cmd_robustify(args: argparse.Namespace) -> int:
    from saeguard.jobs.robustify import RobustifyConfig, run_robustify
    from saeguard.report.robustify_report import summary_sentence

    cfg = config_from_args(RobustifyConfig, args)
    document = run_robustify(cfg)
    print(f"{cfg.out}/robustify.json, {cfg.out}/robustify.html, adapter: {cfg.out}/robust/adapter")
    print(summary_sentence(document))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from saeguard.jobs.run import RunConfig, run

    cfg = config_from_args(RunConfig, args)
    state = run(cfg)
    print(f"report: {state['report']}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from saeguard.activations import ActivationCache

    cache = ActivationCache.open(args.directory)
    if args.verify:
        cache.verify()
    manifest = cache.manifest
    summary = {
        "directory": str(cache.directory),
        "model": manifest["model"],
        "corpus": manifest["corpus"],
        "split": manifest["split"],
        "dtype": manifest["dtype"],
        "cache_dtype": manifest["cache_dtype"],
        "hooks": {h: cache.n_tokens(h) for h in cache.hooks},
        "tokens_per_hook": manifest["tokens_per_hook"],
        "shards": len(cache.shards),
        "bytes": sum(int(s["bytes"]) for s in cache.shards),
        "complete": cache.complete,
        "verified": bool(args.verify),
        "exclusions": manifest["exclusions"],
    }
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_hooks(args: argparse.Namespace) -> int:
    import torch

    from saeguard.models import capture_hooks, load_model

    loaded = load_model(args.model)
    model: Any = loaded.model
    tokenizer: Any = loaded.tokenizer
    points = [loaded.hook_point(h) for h in loaded.hook_names()]
    probe = torch.tensor([tokenizer("Hello world")["input_ids"] or [0]], dtype=torch.long)
    with torch.inference_mode(), capture_hooks(model, points, stop_early=False) as store:
        model.base_model(input_ids=probe, use_cache=False)
    if args.json:
        print(json.dumps({p.name: list(store[p.name].shape[2:]) for p in points}, indent=2))
        return 0
    print(f"{loaded.name}: {loaded.family}, {loaded.n_layers} layers, d_model={loaded.d_model}")
    print(f"{'hook point':<16} shape")
    for point in points:
        shape = ", ".join(str(s) for s in store[point.name].shape[2:])
        print(f"{point.name:<16} [batch, seq, {shape}]")
    return 0


def _cmd_corpora(args: argparse.Namespace) -> int:
    from saeguard.data import CORPORA, load_corpus

    rows = []
    for name, info in CORPORA.items():
        try:
            corpus = load_corpus(name)
            size = f"{len(corpus.documents):>6} docs {corpus.n_chars / 1e6:>6.2f}M chars"
            status = "ok"
        except SaeguardError as exc:
            size, status = f"{'-':>6} docs {'-':>6}  chars", f"missing: {exc}".splitlines()[0]
        rows.append((name, size, info.labels or "-", info.license, info.source, status))
    if args.json:
        keys = ("name", "size", "labels", "license", "source", "status")
        print(json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=2))
        return 0
    for name, size, labels, lic, source, status in rows:
        print(f"{name:<18} {size}  labels: {labels}")
        print(
            f"{'':<18} source: {source}; license: {lic}" + ("" if status == "ok" else f"; {status}")
        )
    print(
        "\nAlso accepted as --corpus: a .txt file (blank-line separated documents), a .jsonl "
        "file (field 'text', optional 'label'), a .csv file (column 'text'), or "
        "hf:DATASET[:CONFIG][@SPLIT]."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from saeguard.jobs.harvest import HarvestConfig

    parser = argparse.ArgumentParser(
        prog="saeguard",
        description="Sparse autoencoders that make language models' failures visible.",
    )
    parser.add_argument("--version", action="version", version=f"saeguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    parser.add_argument("-q", "--quiet", action="store_true", help="Log warnings and errors only.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from saeguard.jobs.run import RunConfig

    p = sub.add_parser(
        "run",
        help="The main job end to end: train a masked SAE, evaluate, fit the OOD monitor, "
        "benchmark, report.",
        description=(
            "On the embedded default (SmolLM2-135M + wiki-en) or any model and corpus: harvest "
            "activations and train a masked TopK SAE, evaluate it (core + CE), fit and calibrate "
            "the OOD monitor, run the OOD benchmark and write OUT/index.html linking every "
            "report. Progress bars throughout; running the same command again after an "
            "interruption resumes instead of starting over."
        ),
    )
    add_config_arguments(p, RunConfig, exclude=RunConfig.PLANNED)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "harvest",
        help="Cache a model's activations at one or more hook points.",
        description=(
            "Run the model over a corpus split and cache the activations at the given hook points "
            "in a sharded, checksummed directory. The forward pass stops after the deepest hook. "
            "Special tokens and norm outliers are excluded by default. Running the same command "
            "again after an interruption resumes where it stopped."
        ),
    )
    add_config_arguments(p, HarvestConfig, aliases={"hooks": ["--hook"]})
    p.set_defaults(func=_cmd_harvest)

    from saeguard.jobs.train import TrainJobConfig

    p = sub.add_parser(
        "train",
        help="Train one or several SAEs, straight from the model or from a harvest cache.",
        description=(
            "Train SAEs on a model's activations at one hook point. Several --arch, --k or "
            "--expansion values train several SAEs from one activation stream in one pass. "
            "Masked regularization (--mask-prob) replaces input tokens by a mask token before "
            "the model runs. Checkpoints every --checkpoint-every steps: running the same "
            "command again resumes with bit-identical results. Writes cfg.json + "
            "sae_weights.safetensors (SAELens-compatible), metrics.jsonl and train_results.json."
        ),
    )
    add_config_arguments(
        p, TrainJobConfig, aliases={"hooks": ["--hook"], "architectures": ["--arch"]}
    )
    p.set_defaults(func=_cmd_train)

    from saeguard.jobs.eval import EvalConfig

    p = sub.add_parser(
        "eval",
        help="Evaluate an SAE: reconstruction, CE recovered, absorption, probing, OOD probing.",
        description=(
            "Run benchmark metrics (SPEC section 4) on one SAE directory and write eval.json "
            "(validated against saeguard/jobs/eval.schema.json), eval_samples.json (per-unit "
            "values for `saeguard compare`) and a self-contained eval.html with plots. The model, "
            "hook and exclusion rules come from the SAE's cfg.json; text comes from held-out "
            "splits. Finished evals are kept: re-running the same command resumes."
        ),
    )
    p.add_argument("sae_dir", help="Directory holding cfg.json + sae_weights.safetensors.")
    add_config_arguments(p, EvalConfig, aliases=EvalConfig.CLI_ALIASES, exclude=EvalConfig.FOLLOWED)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "compare",
        help="Compare evaluated SAEs side by side, with bootstrap intervals on differences.",
        description=(
            "Read the eval.json of each directory and print a side-by-side table. Each column "
            "after the first shows its difference from the first SAE with a bootstrap 95%% "
            "interval (paired over the same contexts, tasks or letters when both SAEs were "
            "scored on the same ones). Writes compare.html (and compare.md) to --out."
        ),
    )
    p.add_argument(
        "directories", nargs="+", help="SAE (or eval output) directories with eval.json."
    )
    p.add_argument(
        "--out", default="", help="Directory for compare.html and compare.md (empty: none)."
    )
    p.add_argument(
        "--metrics", default="", help="Comma-separated metric names to show (empty: all)."
    )
    p.add_argument("--markdown", action="store_true", help="Also print the markdown table.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap.")
    p.set_defaults(func=_cmd_compare)

    from saeguard.jobs.studies import MaskingStudyConfig

    p = sub.add_parser(
        "study",
        help="Reproducible studies; `study masking` tests the masked-regularization claim.",
        description="Studies that train and evaluate several SAEs and write a report.",
    )
    studies = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    p = studies.add_parser(
        "masking",
        help="Baseline vs masked TopK SAEs: absorption, probing, OOD gap, fidelity.",
        description=(
            "Train TopK SAEs with masked regularization (each --mask-probs value; 0 is the "
            "baseline) at each --ks sparsity with --seeds seeds on the same activation budget, "
            "evaluate them on the same held-out text and write study.md, study.html and "
            "study.json: mean full absorption, absorption fraction, sparse probing (k=1, 5), "
            "OOD probing AUC and gap, explained variance, CE loss recovered - means over seeds "
            "with bootstrap intervals and paired differences from the baseline. Re-running "
            "resumes: finished SAEs and evaluations are kept."
        ),
    )
    add_config_arguments(
        p,
        MaskingStudyConfig,
        aliases={f"eval.{k}": v for k, v in EvalConfig.CLI_ALIASES.items()},
        exclude=(*MaskingStudyConfig.EVAL_OWN, *(f"eval.{k}" for k in EvalConfig.FOLLOWED)),
    )
    p.set_defaults(func=_cmd_study_masking)

    from saeguard.jobs.ood import OodBenchmarkConfig
    from saeguard.ood import MonitorConfig

    p = sub.add_parser(
        "ood",
        help="Detect out-of-distribution inputs: fit a monitor, score texts, benchmark it.",
        description=(
            "The OOD monitor of SPEC section 5: fallacious SAE latents (rare or out of range "
            "on in-distribution text), reconstruction error, L0 shift and their energy, beside "
            "Mahalanobis, k-NN and LM-confidence baselines."
        ),
    )
    ood = p.add_subparsers(dest="ood_command", metavar="ACTION", required=True)
    p = ood.add_parser(
        "fit",
        help="Fit a monitor's ID statistics on an SAE and calibrate its threshold.",
        description=(
            "Fit in-distribution statistics (per-latent firing rates and activation quantiles, "
            "top ID contexts, reconstruction error, pooled-activation covariance) on the train "
            "split of the SAE's corpus, calibrate each score's threshold on the validation "
            "split for --target-fpr, and save the monitor directory (monitor.json, "
            "id_stats.safetensors, a copy of the SAE)."
        ),
    )
    p.add_argument("sae_dir", help="SAE directory (cfg.json + sae_weights.safetensors).")
    p.add_argument("--out", required=True, help="Monitor directory to write.")
    p.add_argument("--model", default="", help="Model (empty: the one in the SAE's cfg.json).")
    p.add_argument("--corpus", default="", help="ID corpus (empty: the SAE's training corpus).")
    p.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Calibrate thresholds on the corpus's validation split (default: on).",
    )
    add_config_arguments(p, MonitorConfig)
    p.set_defaults(func=_cmd_ood_fit)

    p = ood.add_parser(
        "score",
        help="Score texts with a monitor; one JSON line per text.",
        description=(
            "Score texts given as arguments, read from --file, or from stdin. Each output line "
            "is a JSON object: every score, the flag (when calibrated) and, for flagged texts, "
            "the top fallacious latents with where they fired and their top in-distribution "
            "contexts. Empty texts get an error field; invalid UTF-8 is replaced and warned "
            "about; texts longer than the context are scored in windows (up to the monitor's "
            "max_windows, then marked truncated)."
        ),
    )
    p.add_argument("texts", nargs="*", help="Texts to score (default: read --file or stdin).")
    p.add_argument("--monitor", required=True, help="Monitor directory from `saeguard ood fit`.")
    p.add_argument("--file", default="", help="Read texts from this file ('-' or empty: stdin).")
    p.add_argument(
        "--input-format",
        choices=("lines", "jsonl", "whole"),
        default="lines",
        help="lines: one text per line; jsonl: objects with a 'text' field; whole: one text.",
    )
    p.add_argument("--model", default="", help="Model (empty: the one the monitor was fitted on).")
    p.add_argument(
        "--adapter",
        default="",
        help="LoRA adapter directory from `saeguard robustify`, merged into the model first.",
    )
    p.add_argument(
        "--with-lm", action="store_true", help="Also compute the LM baselines (full forward)."
    )
    p.add_argument(
        "--explain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Explain flagged texts (default: on).",
    )
    p.add_argument("--explain-all", action="store_true", help="Explain every text, flagged or not.")
    p.set_defaults(func=_cmd_ood_score)

    p = ood.add_parser(
        "benchmark",
        help="AUROC and FPR@95 of every score and baseline on every shift, with an HTML report.",
        description=(
            "Score in-distribution test texts and each shift (typos at several rates, jailbreak "
            "wrapping, in-the-wild jailbreaks, other languages, another domain, code) with "
            "every SAE score and baseline; write ood_benchmark.json (validated against its "
            "schema), ood_benchmark.md, ood_report.html (ROC curves, histograms) and "
            "examples.html (explained alarms), plus the calibrated threshold's measured FPR. "
            "Scores are saved per set: re-running resumes."
        ),
    )
    p.add_argument("--monitor", required=True, help="Monitor directory from `saeguard ood fit`.")
    p.add_argument("--out", required=True, help="Directory for the results and reports.")
    add_config_arguments(p, OodBenchmarkConfig)
    p.set_defaults(func=_cmd_ood_benchmark)

    from saeguard.jobs.robustify import RobustifyConfig

    p = sub.add_parser(
        "robustify",
        help="LoRA fine-tuning that keeps SAE latents steady under a shift; before/after report.",
        description=(
            "Train LoRA adapters (peft) so that on perturbed text (--shift, e.g. typos:0.2) the "
            "frozen SAE's latents at its hook stay close to those of the clean text, plus the "
            "next-token loss on clean ID text to keep capability (SPEC section 6). Measures the "
            "base model and the adapted one on the same held-out texts and seeds: fallacious "
            "count and energy on perturbed text, the OOD AUROC, next-token loss on perturbed and "
            "clean text, topic-probe accuracy on perturbed text (probe trained on clean base-"
            "model activations). Writes OUT/robust/adapter (load it with --adapter in `ood "
            "score`, `ood benchmark` and `eval`), robustify.json (validated against its schema) "
            "and robustify.html. Checkpoints every --checkpoint-every steps: running the same "
            "command again resumes."
        ),
    )
    add_config_arguments(p, RobustifyConfig, exclude=RobustifyConfig.FOLLOWED)
    p.set_defaults(func=_cmd_robustify)

    p = sub.add_parser(
        "cache",
        help="Summarise an activation cache and check its shard checksums.",
        description=(
            "Print what an activation cache holds (model, hooks, tokens, exclusions). With "
            "--verify, recompute every shard's SHA-256 and name any corrupt shard."
        ),
    )
    p.add_argument("directory", help="Directory written by `saeguard harvest`.")
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Check every shard's SHA-256 against the manifest (default: on).",
    )
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser(
        "hooks",
        help="List a model's hook points with their shapes.",
        description="List the uniform hook-point names of a model and the shape each produces.",
    )
    p.add_argument("model", help="Embedded name (smollm2-135m, gemma3-270m), HF id or directory.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    p.set_defaults(func=_cmd_hooks)

    p = sub.add_parser(
        "corpora",
        help="List the registered corpora with their sizes, labels and licenses.",
        description="List the registered corpora with their sizes, labels, sources and licenses.",
    )
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    p.set_defaults(func=_cmd_corpora)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SaeguardError as exc:
        print(f"saeguard: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a permission, ...: one line, unless -v asks for more
        if args.verbose:
            raise
        print(f"saeguard: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saeguard: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        release_output_locks()  # in-process callers (tests, notebooks) may run another command


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

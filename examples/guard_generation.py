"""Generate under an OOD guard: a fitted monitor judges the prompt (and, with --check-every, the
running text every N new tokens); a flag stops generation (--policy stop) or is only recorded
(--policy mark). Prints the result and every verdict as one JSON object.

    python examples/guard_generation.py --monitor runs/mon --prompt "The Nile is a river" \\
        --policy stop --check-every 8 --max-new-tokens 40
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from saeguard.errors import SaeguardError
from saeguard.guard import Guard, GuardConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--monitor", required=True, help="monitor directory (saeguard ood fit)")
    parser.add_argument("--prompt", default="The history of the city", help="prompt text")
    parser.add_argument(
        "--policy",
        choices=["stop", "mark"],
        default="stop",
        help="stop: a flag ends generation; mark: it is only recorded",
    )
    parser.add_argument(
        "--check-every", type=int, default=0, help="score the running text every N new tokens"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="where the monitor's model runs")
    parser.add_argument("--no-explain", action="store_true", help="leave out explanations")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        cfg = GuardConfig(
            policy=args.policy, check_every=args.check_every, explain=not args.no_explain
        )
        guard = Guard.load(args.monitor, cfg, device=args.device)
        result = guard.generate(args.prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
    except SaeguardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

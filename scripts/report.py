"""Generate the run report, or clear the report directory.

    python scripts/report.py generate [--hourly-price 24.0]   # writes <home>/report/report.md (+ PNG plots)
    python scripts/report.py reset                            # deletes everything in <home>/report
"""

from __future__ import annotations

import argparse
import math

from nanochat_jax import report
from nanochat_jax.common import run_script


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["generate", "reset"])
    p.add_argument("--hourly-price", type=float, default=None,
                   help="dollars per hour of the machine, for the cost estimate (default: $3 per GPU-hour when base "
                        "training ran on GPUs, as nanochat's $24/hour for 8 x H100; no estimate otherwise)")
    args = p.parse_args(argv)
    if args.hourly_price is not None and not (math.isfinite(args.hourly_price) and args.hourly_price >= 0):
        p.error(f"--hourly-price must be a number >= 0, got {args.hourly_price}")
    if args.command == "reset":
        removed = report.reset()
        for path in removed:
            print(f"removed {path}")
        print(f"report directory {report.report_dir()} is empty ({len(removed)} entries removed)")
        return removed
    path = report.generate(hourly_price=args.hourly_price)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_script(main)

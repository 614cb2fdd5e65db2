"""Measure the 50-step CFG reference's 1,000-sample judge row once and keep it beside the weights
(reference_eval.json, keyed by the weights' SHA-256), so the main job's before/after table does not spend
minutes re-sampling a frozen model. Minutes on a CPU.

    python -m jobs.digits.reference_eval [--weights-dir DIR]
"""
from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights-dir", default=None, help="digits weights directory (default: the shipped one)")
    args = ap.parse_args(argv)
    from jobs.digits.demo_report import reference_row

    print(json.dumps(reference_row(args.weights_dir, remeasure=True), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

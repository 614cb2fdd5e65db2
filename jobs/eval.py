"""`distar eval` as a job (e.g. `ray job submit ... -- python -m jobs.eval --prompts ... --rewards-backend serve`).

    python -m jobs.eval --prompts /data/PartiPrompts.tsv --limit 200 \
        --models "SDXL-base=ref@50:stabilityai/stable-diffusion-xl-base-1.0" DI*@100=runs/di_star/final \
        --rewards image_reward:/w/IR aesthetic:/w/aes pickscore:/w/pick clip_score:/w/clip \
        --rewards-backend serve --device cuda --mlflow --out results/parti

Same flags as `distar eval` (see distar/commands/evaluate.py); with --rewards-backend serve it uses the Ray
cluster at $RAY_ADDRESS (a Ray Job's own cluster) and its reward Serve apps, starting those that are missing.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from distar.cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())

"""DI* training on Ray as a job (also what `distar train` runs when the config asks for Ray, Serve or MLflow).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.train --config distar/configs/digits_ray.yaml train.steps=50
    python -m jobs.train --config digits_ray            # starts a private local Ray cluster for the run

Prints the summary (JSON), a results table (the world's own metrics of the starting generator and of the
trained EMA generator, same seeds) and the registered model URI. Paths in the config are resolved against
the job's working directory: on a cluster give absolute train.out_dir / ray.storage_path on shared storage,
and MLFLOW_TRACKING_URI (e.g. via --runtime-env-json '{"env_vars": {...}}').
"""
from __future__ import annotations

import argparse
import json
import os
import sys


INTERRUPTED = "jobs.train: interrupted; checkpoints written so far are kept (the same command resumes)"


def results_table(cfg, final_dir: str, seed: int = 1234) -> str:
    """Markdown before/after table of a small world (worlds without one, e.g. SDXL, get "": the driver then
    loads no model at all). Digits: reference / init / trained on 1,000 samples with the three conditions."""
    if cfg.model.world == "digits" and cfg.model.generator is None:
        from jobs.digits.demo_report import demo_table

        return demo_table(final_dir, f"DI* on Ray ({cfg.ray.run_name or cfg.name}, EMA)",
                          weights_dir=cfg.model.weights_dir)
    if cfg.model.world not in ("gaussian2d", "digits"):
        return ""
    import torch

    from distar.checkpoint import load_generator_state
    from distar.tables import markdown_table
    from distar.worlds import build_bundle

    bundle = build_bundle(cfg.model, "cpu")
    rows = [{"model": "start (init generator)",
             **bundle.evaluate(bundle.generator.eval(), torch.Generator().manual_seed(seed))}]
    bundle.generator.load_state_dict(load_generator_state(final_dir))
    rows.append({"model": f"DI* on Ray ({cfg.ray.run_name or cfg.name}, EMA)",
                 **bundle.evaluate(bundle.generator.eval(), torch.Generator().manual_seed(seed))})
    return markdown_table(rows, list(rows[0]))


def main(argv: list[str] | None = None) -> int:
    from distar.stopping import ExitAtOnce

    with ExitAtOnce(INTERRUPTED):  # Ctrl-C while torch/diffusers/Ray import: nothing runs yet, exit at once
        args = _parse(argv)
        if not args.print_config:  # the heavy imports _run needs (--print-config starts nothing, imports no Ray)
            import distar.ray_train  # noqa: F401
            import services.reward_service  # noqa: F401
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C outside training (Ray start-up, the table): the stop handler was not on
        print(INTERRUPTED, file=sys.stderr)
        return 130


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML file or built-in config name (e.g. digits_ray)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 ray.num_workers=2")
    ap.add_argument("--no-table", action="store_true", help="skip the before/after results table")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config (YAML) and exit: nothing starts (checks an entrypoint offline)")
    ap.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity", default=0)
    ap.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity")
    return ap.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    from distar.config import dump_config, load_config
    from distar.errors import UserError
    from distar.logs import setup_logging
    from distar.stopping import StopSignals, stopped_line

    setup_logging(args.verbosity)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        from distar.memory_plan import require_fit
        from distar.ray_train import run_on_ray
        from services.reward_service import deploy_rewards

        require_fit(cfg)  # GPU runs: refuse, with the memory table, a run that cannot fit (ray.plan_check)
        stop = StopSignals("saving a checkpoint after this step, then stopping")
        summary = run_on_ray(cfg, deploy_rewards=deploy_rewards, stop=stop)  # SIGINT/SIGTERM: save, exit 130/143
    except UserError as err:
        print(f"jobs.train: error: {err}", file=sys.stderr)
        return 2
    if stop():
        print(stopped_line("jobs.train", stop.name, summary.get("step"), summary.get("checkpoint")), file=sys.stderr)
        return stop.exit_code
    print(json.dumps(summary, indent=2, default=str), flush=True)
    if not args.no_table:
        table = results_table(cfg, summary["final_dir"])
        if table:
            print("\n" + table, flush=True)
    if "model_uri" in summary:
        print(f"\nregistered: {summary['model_uri']} (version {summary['version']}); "
              f"try: distar generate --model {summary['model_uri']} --prompt 'a handwritten digit 3' --out samples/",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation on prompt files (PartiPrompts or plain lines): multi-step references and one-step generators,
generated once into a resumable image cache, scored by reward models (in process or on Ray Serve), written
as the paper's results table with a per-category breakdown, grids and a reward-vs-divergence plot.

    cache.py    images per model / prompt index (PNG) + generation timings
    models.py   --models specs -> EvalModel; per-image seeds
    scoring.py  --rewards name[:path] -> a reward client (local or Serve)
    report.py   tables, divergence proxy, grids, plot
    run.py      the `distar eval --prompts ...` pipeline
    tracking.py MLflow logging of a finished evaluation
"""

"""The digits world: sklearn's handwritten digits at 16x16, a CLIP-conditioned diffusers teacher, a one-step
generator distilled from it, proxy rewards learned from simulated preferences, and independent judges.

Files: data (splits, gold preference), text (prompts, CLIP BPE tokenizer), models (architectures, I/O),
bundle (the ModelBundle), rewards (proxies), evaluation (judges, table), loading (model names for the CLI),
train_teacher / train_small / distill / build_weights (rebuilding the shipped weights), results (the table).
"""

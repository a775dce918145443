"""Everything distributed about training: config, DeepSpeed engine, schedule, checkpoints, metrics.

One concern per module; nothing here imports `run_pretrain.py`, and model math lives in `models/`.
"""

"""Everything distributed about training: config, DeepSpeed engine, loop, schedule, checkpoints, metrics, memory.

One concern per module, none tied to a task: what is specific to a task lives in `scale.tasks`.
Nothing here imports `run_*.py`, and model math lives in `models/`.
"""

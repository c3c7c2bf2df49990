"""Training: config, loop, checkpoints, distributed helpers."""

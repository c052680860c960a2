"""Training: optimizer, the jitted train step (and, with the trainer, state, checkpoints, metrics, the CLI)."""

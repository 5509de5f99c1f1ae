"""Training: losses, AdamW, TrainState, the jitted step, the loop, metrics."""

"""Training: losses, AdamW, TrainState, the jitted step, the SFT / pretraining loop, metrics,
and what every loop reuses: inputs, resume / save, evaluation."""

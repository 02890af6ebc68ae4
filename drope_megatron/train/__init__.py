"""Training: the smoke loop today; the DeepSpeed recalibration loop, schedules and checkpoints next."""

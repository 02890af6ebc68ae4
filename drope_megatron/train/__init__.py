"""Training: the DeepSpeed loop for pretrain/recalibrate (loop, engine), resumable checkpoints,
metrics, and smoke.py, the plain-torch end-to-end check."""

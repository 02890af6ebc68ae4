"""Training: the DeepSpeed loop for pretrain/recalibrate (loop, engine), resumable checkpoints,
ZeRO-3 loading and saving without whole-model gathers (zero3), metrics, and smoke.py, the
plain-torch end-to-end check."""

"""The embedded demo: the whole DroPE story at tiny scale on a CPU (training data mixture, the
staged pipeline that pretrains or reuses a RoPE model, recalibrates, evaluates and exports)."""

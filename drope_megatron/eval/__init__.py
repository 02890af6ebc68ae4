"""Long-context evaluation: perplexity by length, passkey and needle retrieval, RoPE-scaling
baselines (PI, NTK, YaRN) on the same weights, and the JSON / Markdown / PNG report."""

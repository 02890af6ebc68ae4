"""The full-width QK-norm under TP=2, compiled and eager: each rank writes its output and input
gradient for its heads to OUT/rank<N>.pt (the test compares them, and with the unsharded norm)."""

import sys
from pathlib import Path

import torch

from drope_megatron import distributed
from drope_megatron.config import ParallelConfig
from drope_megatron.model.qk_norm import FullWidthRMSNorm
from tests.helpers import tiny_model


def main(out: Path) -> None:
    with distributed.session(ParallelConfig(tensor_model_parallel_size=2)) as env:
        config = tiny_model("model.qk_norm=true", "parallel.tensor_model_parallel_size=2")[0].config
        norm = FullWidthRMSNorm(config, hidden_size=16, num_heads=4)  # 2 heads on each rank
        x = torch.randn(5, 2, 4, 16, generator=torch.Generator().manual_seed(0))
        mine = x[:, :, 2 * env.rank: 2 * env.rank + 2]
        results = {}
        for name, fn in (("eager", norm), ("compiled", torch.compile(norm))):
            inp = mine.clone().requires_grad_()
            y = fn(inp)
            (y * torch.arange(y.numel()).view_as(y)).sum().backward()  # a gradient that differs per element
            results[name] = (y.detach(), inp.grad)
        torch.save(results, out / f"rank{env.rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

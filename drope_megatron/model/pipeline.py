"""Forward passes through megatron-core's pipeline schedule, so the same call works at any PP."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func


def forward_logits(model, tokens: torch.Tensor, keep: int = 0) -> Optional[torch.Tensor]:
    """Logits [b, s, vocab] for one batch of token ids: on the last pipeline stage; None on others.

    Positions are 0..s-1. Build the model with `gather_logits=True` for the full vocabulary on
    every TP rank (otherwise each rank returns its vocabulary slice). `keep` > 0 runs the output
    layer on the last `keep` positions only (as megatron's own inference keeps the last token):
    full logits at long context are tens of GB for a large vocabulary.
    """
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).expand(b, s)

    def step(iterator, model):
        output = model(next(iterator), positions, None)
        return output, lambda out: (out.new_zeros(()), {"logits": out.detach()})

    with torch.no_grad(), _last_positions(model, keep):
        results = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
            seq_length=s, micro_batch_size=b, forward_only=True)
    return results[0]["logits"] if results else None


@contextlib.contextmanager
def _last_positions(model, keep: int):
    """While open, the output layer (last stage only) sees the last `keep` of its [s, b, h] input."""
    layer = getattr(model, "output_layer", None) if keep > 0 else None
    if layer is None:
        yield
        return
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: ((args[0][-keep:], *args[1:]), kwargs), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()

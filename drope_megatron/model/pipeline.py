"""Forward passes through megatron-core's pipeline schedule, so the same call works at any PP."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func


def forward_logits(model, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Logits [b, s, vocab] for one batch of token ids: on the last pipeline stage; None on others.

    Positions are 0..s-1. Build the model with `gather_logits=True` for the full vocabulary on
    every TP rank (otherwise each rank returns its vocabulary slice).
    """
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).expand(b, s)

    def step(iterator, model):
        output = model(next(iterator), positions, None)
        return output, lambda out: (out.new_zeros(()), {"logits": out.detach()})

    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
            seq_length=s, micro_batch_size=b, forward_only=True)
    return results[0]["logits"] if results else None

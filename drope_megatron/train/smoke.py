"""The smallest end-to-end check: a few AdamW steps per positional phase on one fixed batch.

Builds the recipe's model on this rank (TP shards included), trains it in each requested
phase in turn on the same instance (rope, then drope, ...), and returns the loss of every
step. Runs on one process or under any launcher with world size = TP (no data parallelism,
no pipeline: the DeepSpeed loop does those).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from drope_megatron import distributed
from drope_megatron.config import ConfigError, Recipe
from drope_megatron.model import build_model
from drope_megatron.train.engine import adamw


def fixed_batch(recipe: Recipe) -> torch.Tensor:
    """[micro_batch, seq_length + 1] random tokens, identical on every rank (same seed)."""
    gen = torch.Generator().manual_seed(recipe.train.seed)
    shape = (recipe.train.micro_batch_size, recipe.model.seq_length + 1)
    return torch.randint(0, recipe.model.vocab_size, shape, generator=gen)


def grad_norm(model) -> float:
    """The whole model's gradient norm, as DeepSpeed clips by it: a split weight's squares summed over
    the TP ranks, a replicated one's counted once. (Adam hides a gradient's scale from the losses.)"""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    squares = sum(p.grad.detach().float().pow(2).sum() for p in model.parameters()
                  if p.grad is not None and param_is_not_tensor_parallel_duplicate(p))
    squares = torch.as_tensor(squares, dtype=torch.float32)
    torch.distributed.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
    return squares.sqrt().item()


def run_smoke(recipe: Recipe, phases: list[str], steps: int, show_progress: bool = True) -> dict:
    """Train `steps` steps per phase; returns {"losses": {phase: [...]}, "grad_norms": {phase: [...]},
    "local_params": n, ...}."""
    p = recipe.parallel
    if p.pipeline_model_parallel_size != 1:
        raise ConfigError("smoke runs without pipeline parallelism: set parallel.pipeline_model_parallel_size=1")
    with distributed.session(p, recipe.train.seed) as env:
        if env.world_size != p.tensor_model_parallel_size:
            raise ConfigError(f"smoke needs world size == TP ({p.tensor_model_parallel_size}), got "
                              f"{env.world_size}: launch exactly TP processes")
        device = distributed.compute_device()
        model = build_model(recipe.model, p).to(device)
        opt = adamw(model, recipe.train)
        batch = fixed_batch(recipe).to(device)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        losses: dict[str, list[float]] = {}
        norms: dict[str, list[float]] = {}
        bar = tqdm(total=steps * len(phases), disable=not show_progress or env.rank != 0, desc="smoke")
        for phase in phases:
            model.set_phase(phase, recipe.model.rope_layers)
            losses[phase], norms[phase] = [], []
            for _ in range(steps):
                loss = model(tokens, positions, None, labels=labels).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norms[phase].append(grad_norm(model))
                opt.step()
                losses[phase].append(loss.item())
                bar.set_postfix(phase=phase, loss=f"{loss.item():.4f}")
                bar.update()
        bar.close()
        n_local = sum(t.numel() for t in model.parameters())
        return {"losses": losses, "grad_norms": norms, "local_params": n_local, "rank": env.rank, "world_size": env.world_size}

"""Pipeline parallel probe: loads a dist checkpoint at this job's TP/PP and runs megatron's schedule.

    pp_probe.py save CKPT OUT 1 1     (world of 1) build the tiny model, save it as a dist checkpoint,
                                      then run it as `run` does (one process: its imports cost seconds)
    pp_probe.py run  CKPT OUT TP PP   load CKPT at TP x PP, forward two micro-batches through
                                      megatron's pipeline schedule, write the losses of the last stage
"""

import json
import sys
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from drope_megatron import distributed
from drope_megatron.model import build_model
from tests.helpers import tiny_recipe

MICRO, BATCHES = 2, 2


def main(mode: str, ckpt: str, out: Path, tp: int, pp: int) -> None:
    # RoPE in the first and last layers only: a stage must place its layers by their global number.
    # The full-width q/k norm's weight is split over TP ranks in the checkpoint's layout.
    recipe = tiny_recipe("model.num_layers=4", "model.phase=layers", "model.rope_layers=[0,3]", "model.qk_norm=true",
                         f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}")
    distributed.initialize(recipe.parallel)
    model = build_model(recipe.model, recipe.parallel)
    if mode == "save":
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # norms start at 1: moved off it, so a misplaced shard shows
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        Path(ckpt).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt)
        model = build_model(recipe.model, recipe.parallel, initialize=False)  # loaded as the other layouts are
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
    losses = forward(model, recipe)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        layers = [layer.layer_number for layer in model.decoder.layers]
        (out / "losses.json").write_text(json.dumps({"losses": losses, "last_stage_layers": layers}))
    distributed.shutdown()


def forward(model, recipe) -> list[float]:
    n = recipe.model.seq_length
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, recipe.model.vocab_size, (MICRO, n + 1), generator=gen) for _ in range(BATCHES)]
    positions = torch.arange(n).expand(MICRO, n)

    def step(iterator, model):
        batch = next(iterator)
        output = model(batch[:, :-1], positions, None, labels=batch[:, 1:])
        return output, lambda out: (out.mean(), {"loss": out.mean().detach()})

    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(data), model=[model], num_microbatches=BATCHES,
            seq_length=n, micro_batch_size=MICRO, forward_only=True)
    return [r["loss"].item() for r in results]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))

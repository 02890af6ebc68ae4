"""The DeepSpeed engine around the megatron-core model: its config, the parallel-state adapter,
the optimizer and the schedule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from drope_megatron.config import ConfigError, TrainConfig


class MegatronMPU:
    """megatron-core's parallel_state under the names DeepSpeed asks for (older Megatron's `mpu`,
    where "model parallel" meant tensor parallel); every other name passes straight through."""

    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)

    def __getattr__(self, name: str):
        return getattr(parallel_state, name)


# DeepSpeed's spellings of fp32 (its DtypeEnum).
FP32_NAMES = ("fp32", "float32", "float", "torch.float32")


def use_bf16(t: TrainConfig) -> bool:
    return t.precision == "bf16" or (t.precision == "auto" and torch.cuda.is_available())


def deepspeed_config(t: TrainConfig, dp: int) -> dict[str, Any]:
    """DeepSpeed's JSON: the user's file as is (if any), with "auto" and missing fields from the recipe."""
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x "
                          f"data-parallel size = {t.micro_batch_size} x {dp}: change one of them")
    ours: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // per_step,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": use_bf16(t)},
        "fp16": {"enabled": False},  # fills Hugging Face templates' "enabled": "auto"
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # our torch AdamW stays the optimizer, offloaded or not
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.offload_optimizer:
        ours["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if t.deepspeed_config is None:
        return _accumulation_dtype(ours, "the recipe")
    path = Path(t.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config {path} does not exist")
    try:
        theirs = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train.deepspeed_config {path} is not valid JSON (line {exc.lineno})") from None
    _well_formed(path, theirs)
    merged = _fill_auto(theirs, ours)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if merged[key] != ours[key]:
            raise ConfigError(f"{path}: {key}={merged[key]} disagrees with the recipe ({ours[key]}): set it to "
                              "\"auto\" or change train.global_batch_size / train.micro_batch_size")
    _agree(path, merged, t)
    return _accumulation_dtype(merged, str(path))


def _well_formed(path: Path, theirs: Any) -> None:
    """The blocks this project reads are objects; fp16 is refused: the model is built in bf16 or
    fp32, and the steps fp16's loss scaling skips on overflow would still count as steps."""
    if not isinstance(theirs, dict):
        raise ConfigError(f"train.deepspeed_config {path} must be a JSON object of DeepSpeed settings")
    for block in ("bf16", "fp16", "zero_optimization", "data_types"):
        if block in theirs and not isinstance(theirs[block], dict):
            raise ConfigError(f"{path}: {block} must be an object, e.g. \"{block}\": {{...}}, not {theirs[block]!r}")
    if "bfloat16" in theirs:  # DeepSpeed's legacy name, read only when "bf16" is absent (it never is here)
        raise ConfigError(f"{path}: rename the legacy \"bfloat16\" block to \"bf16\"")
    if (theirs.get("fp16") or {}).get("enabled", False) not in (False, "auto"):
        raise ConfigError(f"{path}: fp16 is not supported (bf16 or fp32 only): remove the fp16 block and set "
                          "train.precision=bf16 for mixed precision")


def _accumulation_dtype(config: dict[str, Any], source: str) -> dict[str, Any]:
    """Under bf16 with ZeRO >= 1, gradients accumulate across micro-batches in fp32, as Megatron's
    main grads do (DeepSpeed's default is the model dtype) unless the JSON says otherwise;
    DeepSpeed has no fp32 accumulation for bf16 at ZeRO 0."""
    bf16 = config["bf16"].get("enabled") is True
    stage = config["zero_optimization"].get("stage", 0)
    chosen = (config.get("data_types") or {}).get("grad_accum_dtype")
    if chosen == "auto":  # the recipe decides, as for every "auto" (DeepSpeed itself cannot read it)
        config["data_types"] = {k: v for k, v in config["data_types"].items() if k != "grad_accum_dtype"}
        chosen = None
    if bf16 and stage >= 1 and chosen is None:
        config["data_types"] = {**(config.get("data_types") or {}), "grad_accum_dtype": "fp32"}
    elif bf16 and stage == 0 and chosen in FP32_NAMES:
        raise ConfigError(f"{source}: data_types.grad_accum_dtype={chosen} under bf16 needs ZeRO stage >= 1 "
                          "(DeepSpeed has none at stage 0): raise the stage or remove data_types")
    return config


def _agree(path: Path, merged: dict[str, Any], t: TrainConfig) -> None:
    """The JSON decides what it gives as a value (not "auto"), unless the recipe sets the same thing
    to another value than its default: then neither silently wins. (A recipe that writes the default
    itself is not told apart from one that leaves it out.) The optimizer and schedule are always the
    recipe's."""
    default = TrainConfig()
    stage = merged["zero_optimization"].get("stage", 0)
    checks = (("zero_optimization.stage", stage, t.zero_stage, t.zero_stage != default.zero_stage, "train.zero_stage"),
              ("gradient_clipping", merged.get("gradient_clipping", 0.0), t.grad_clip,
               t.grad_clip != default.grad_clip, "train.grad_clip"),
              ("bf16.enabled", merged["bf16"].get("enabled", False), use_bf16(t), t.precision != "auto",
               "train.precision"))
    for key, theirs, ours, recipe_sets_it, field in checks:
        if recipe_sets_it and theirs != ours:
            raise ConfigError(f"{path}: {key}={theirs} disagrees with {field} ({ours}): set it to \"auto\" in the "
                              f"JSON or leave {field} at its default")
    for block in ("optimizer", "scheduler"):
        if block in merged:  # DeepSpeed would drop it silently in favour of ours
            raise ConfigError(f"{path}: remove its {block} block; the recipe's train section sets the {block}")
    if t.offload_optimizer and stage < 1:
        raise ConfigError(f"train.offload_optimizer needs ZeRO stage >= 1, and {path} has stage {stage}")
    offload = merged["zero_optimization"].get("offload_optimizer") or {}
    if t.offload_optimizer and offload.get("device", "none") in ("none", None):
        raise ConfigError(f"{path}: zero_optimization.offload_optimizer={json.dumps(offload)} disagrees with "
                          "train.offload_optimizer (true): set it to \"auto\" in the JSON or leave "
                          "train.offload_optimizer at its default")


def _fill_auto(theirs: Any, ours: Any) -> Any:
    if theirs == "auto":
        return ours
    if isinstance(theirs, dict) and isinstance(ours, dict):
        merged = {k: _fill_auto(theirs[k], ours.get(k)) if k in ours else theirs[k] for k in theirs}
        return {**{k: v for k, v in ours.items() if k not in theirs}, **merged}
    return theirs


def scheduler(t: TrainConfig, optimizer):
    """constant / cosine / warmup-stable-decay with linear warmup (from 0; warmup-stable-decay's from
    min_lr_ratio x lr), from transformers' schedules."""
    from transformers import optimization as sched

    if t.schedule == "constant":
        return sched.get_constant_schedule_with_warmup(optimizer, t.warmup_steps)
    if t.schedule == "cosine":
        return sched.get_cosine_with_min_lr_schedule_with_warmup(optimizer, t.warmup_steps, t.steps,
                                                                 min_lr_rate=t.min_lr_ratio)
    return sched.get_wsd_schedule(optimizer, t.warmup_steps, t.decay_steps, num_training_steps=t.steps,
                                  min_lr_ratio=t.min_lr_ratio, decay_type="cosine")


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: norms' gains and biases (1-D) are not decayed, as in Megatron."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def rates_from_schedule(schedule) -> None:
    """After a resume: each group's rate as this run's schedule gives it at the resumed step. The
    optimizer's saved rates are the old schedule's, which another train.steps or warmup changes,
    and the first step after the resume would take them."""
    for group, base, rate in zip(schedule.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["lr"] = base * rate(schedule.last_epoch)


def adamw(model, t: TrainConfig) -> torch.optim.AdamW:
    """torch's AdamW; for a model on a GPU its one-kernel (fused) form: the default there, a loop
    of multi-tensor ops, passes over the fp32 state several times a step. (ZeRO-Offload steps the
    host's copy with torch's fused CPU kernel.)"""
    groups = param_groups(model, t.weight_decay)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             **({"fused": True} if fused else {}))


def initialize(model, t: TrainConfig, ds_config: dict[str, Any]):
    """deepspeed.initialize with torch AdamW, our schedule and megatron's parallel groups."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=adamw(model, t), config=ds_config, mpu=MegatronMPU(),
                                      lr_scheduler=lambda opt: scheduler(t, opt), dist_init_required=False)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # Without ZeRO, DeepSpeed's backward still flattens every gradient, all-reduces it over
        # this one rank and copies it back (5 % of a CPU step here): an identity, skipped.
        engine.enable_backward_allreduce = False
    return engine

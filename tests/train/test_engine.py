"""The DeepSpeed config and optimizer the recipe makes: a JSON decides what it gives as a value
unless the recipe says otherwise (then an error, not a silent winner); no weight decay on norms
and biases; compiled layers train as the eager ones."""

from __future__ import annotations

import json

import pytest

from drope_megatron.config import ConfigError, TrainConfig
from drope_megatron.train.engine import adamw, deepspeed_config, param_groups
from tests.helpers import tiny_model


def _json(tmp_path, **fields):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "bf16": {"enabled": "auto"}, **fields}))
    return str(path)


def test_the_json_decides_what_the_recipe_leaves_at_its_default(tmp_path):
    ds = _json(tmp_path, zero_optimization={"stage": 3}, gradient_clipping=0.5)
    merged = deepspeed_config(TrainConfig(deepspeed_config=ds, offload_optimizer=True), dp=1)
    assert merged["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert merged["gradient_clipping"] == 0.5 and merged["bf16"] == {"enabled": False}


@pytest.mark.parametrize("fields,recipe,message", [
    ({"zero_optimization": {"stage": 3}}, {"zero_stage": 1}, "zero_optimization.stage=3 disagrees with "
                                                             "train.zero_stage (1)"),
    ({"gradient_clipping": 0.5}, {"grad_clip": 2.0}, "gradient_clipping=0.5 disagrees with train.grad_clip (2.0)"),
    ({"bf16": {"enabled": False}}, {"precision": "bf16"}, "bf16.enabled=False disagrees with train.precision"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 1}}}, {}, "remove its optimizer block"),
    ({"zero_optimization": {"stage": 0}}, {"offload_optimizer": True}, "offload_optimizer needs ZeRO stage >= 1"),
    ({"fp16": {"enabled": True}}, {}, "fp16 is not supported (bf16 or fp32 only)"),
    ({"bf16": True}, {}, "bf16 must be an object"),
    # DeepSpeed reads the legacy block only without "bf16", which the merge always has.
    ({"bfloat16": {"enabled": True}}, {}, 'rename the legacy "bfloat16" block to "bf16"'),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}, {"offload_optimizer": True},
     'zero_optimization.offload_optimizer={"device": "none"} disagrees with train.offload_optimizer (true)'),
])
def test_a_json_that_contradicts_the_recipe_is_refused(tmp_path, fields, recipe, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        deepspeed_config(TrainConfig(deepspeed_config=_json(tmp_path, **fields), **recipe), dp=1)


def test_a_json_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object of DeepSpeed settings"):
        deepspeed_config(TrainConfig(deepspeed_config=str(path)), dp=1)
    merged = deepspeed_config(TrainConfig(deepspeed_config=_json(tmp_path, fp16={"enabled": False})), dp=1)
    assert merged["fp16"] == {"enabled": False}  # fp16 off is fine
    # Hugging Face's DeepSpeed templates say "auto": here that can only mean off.
    merged = deepspeed_config(TrainConfig(deepspeed_config=_json(tmp_path, fp16={"enabled": "auto"})), dp=1)
    assert merged["fp16"] == {"enabled": False}


def test_no_weight_decay_on_norms_and_biases(megatron_world):
    model, _ = tiny_model("model.qkv_bias=true")
    decay, plain = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert any("layernorm" in names[id(p)] or "norm" in names[id(p)] for p in plain["params"])
    assert any("bias" in names[id(p)] for p in plain["params"])
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))
    decayed, undecayed = adamw(model, TrainConfig(weight_decay=0.1)).param_groups  # what the optimizer gets
    assert (decayed["weight_decay"], undecayed["weight_decay"]) == (0.1, 0.0)
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in undecayed["params"])
    assert deepspeed_config(TrainConfig(grad_clip=0.7), dp=1)["gradient_clipping"] == 0.7


@pytest.mark.parametrize("stage", [0, 1])
def test_one_rank_without_zero_skips_the_identity_all_reduce(megatron_world, stage):
    import torch

    from drope_megatron.train.engine import adamw, initialize
    from tests.helpers import batch

    model, recipe = tiny_model()
    twin, _ = tiny_model()  # the same weights
    t = recipe.train
    engine = initialize(model, t, deepspeed_config(TrainConfig(zero_stage=stage, grad_clip=0.0), dp=1))
    # ZeRO 1 gathers its partition's gradients through that reduction even on one rank.
    assert engine.enable_backward_allreduce is (stage != 0)
    tokens, positions = batch(recipe)
    engine.backward(engine(tokens[:, :-1], positions[:, :-1], None, labels=tokens[:, 1:]).mean())
    engine.step()
    # The step is exactly a plain AdamW step on the same gradients: nothing was left unreduced.
    opt = adamw(twin, t)
    twin(tokens[:, :-1], positions[:, :-1], None, labels=tokens[:, 1:]).mean().backward()
    opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("stage,offload", [(1, False), (1, True), (2, False), (3, False)])
def test_bf16_with_zero_accumulates_gradients_in_fp32(megatron_world, stage, offload):
    import torch

    from drope_megatron.train.engine import initialize
    from tests.helpers import batch

    config = deepspeed_config(TrainConfig(zero_stage=stage, precision="bf16", micro_batch_size=2,
                                          global_batch_size=4, offload_optimizer=offload), dp=1)
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    model, recipe = tiny_model()
    engine = initialize(model.bfloat16(), recipe.train, config)
    # ZeRO 1 gets DeepSpeed's BF16_Optimizer (fp32 gradients), unless it offloads; the ZeRO
    # optimizers keep fp32 gradient copies.
    fp32 = (type(engine.optimizer).__name__ == "BF16_Optimizer" if stage == 1 and not offload
            else engine.optimizer.gradient_accumulation_dtype is torch.float32)
    assert fp32
    tokens, positions = batch(recipe)
    for _ in range(2):  # two micro-batches: one accumulation boundary
        engine.backward(engine(tokens[:, :-1], positions[:, :-1], None, labels=tokens[:, 1:]).float().mean())
        engine.step()
    assert engine.global_steps == 1 and torch.isfinite(torch.as_tensor(engine.get_global_grad_norm()))


def test_fp32_accumulation_choices(tmp_path):
    assert "data_types" not in deepspeed_config(TrainConfig(zero_stage=2, precision="fp32"), dp=1)
    assert "data_types" not in deepspeed_config(TrainConfig(zero_stage=0, precision="bf16"), dp=1)
    kept = _json(tmp_path, zero_optimization={"stage": 2}, data_types={"grad_accum_dtype": "bf16"})
    assert deepspeed_config(TrainConfig(deepspeed_config=kept, precision="bf16"), dp=1)["data_types"] == \
        {"grad_accum_dtype": "bf16"}  # the JSON's choice stands
    auto = _json(tmp_path, zero_optimization={"stage": 1}, data_types={"grad_accum_dtype": "auto"})
    assert deepspeed_config(TrainConfig(deepspeed_config=auto, precision="bf16"), dp=1)["data_types"] == \
        {"grad_accum_dtype": "fp32"}  # "auto" is the recipe's rule (DeepSpeed failed on the word itself)
    refused = _json(tmp_path, zero_optimization={"stage": 0}, data_types={"grad_accum_dtype": "float"})
    with pytest.raises(ConfigError, match="grad_accum_dtype=float under bf16 needs ZeRO stage >= 1"):
        deepspeed_config(TrainConfig(deepspeed_config=refused, precision="bf16"), dp=1)


def test_compiled_layers_train_as_the_eager_ones_under_zero3(megatron_world):
    # ZeRO-3 gathers each layer's parameters in hooks around its (compiled) call; ZeRO 0 is
    # tested end to end in tests/train/test_loop.py.
    import torch
    from torch._dynamo.utils import counters

    from drope_megatron.train.engine import initialize
    from tests.helpers import batch

    torch._dynamo.reset()  # compiled here, not found in an earlier test's cache
    eager, recipe = tiny_model()
    compiled, _ = tiny_model()  # the same weights
    compiled.compile_layers()
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints are unchanged
    config = deepspeed_config(TrainConfig(zero_stage=3), dp=1)
    engines = [initialize(m, recipe.train, config) for m in (eager, compiled)]
    tokens, positions = batch(recipe)
    captured = counters["stats"]["calls_captured"]
    for _ in range(2):
        losses = []
        for engine in engines:
            loss = engine(tokens[:, :-1], positions[:, :-1], None, labels=tokens[:, 1:]).mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0])
    assert counters["stats"]["calls_captured"] > captured  # the layers did run through dynamo


def test_warmup_stable_decay_schedule():
    """wsd (the SmolLM recipes'): linear warmup (from min_lr_ratio, as transformers' schedule starts),
    a flat stretch, then a cosine decay to min_lr_ratio over the last decay_steps."""
    import math

    import torch

    from drope_megatron.train.engine import scheduler

    t = TrainConfig(schedule="wsd", steps=10, warmup_steps=2, decay_steps=4, min_lr_ratio=0.1, lr=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    sched = scheduler(t, opt)
    seen = []
    for _ in range(t.steps + 1):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert seen == pytest.approx([0.1, 0.55, 1.0, 1.0, 1.0, 1.0, *cosine, 0.1])
    t = TrainConfig(schedule="constant", steps=5, warmup_steps=2, lr=1.0)  # warmup from 0, then flat
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    sched, seen = scheduler(t, opt), []
    for _ in range(t.steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])

"""Which training checkpoints are kept, and the one-line refusal of a `latest` that names nothing."""

from __future__ import annotations

import pytest

from drope_megatron.config import ConfigError
from drope_megatron.train import checkpointing


def _complete(ckpt_dir, *steps):
    for step in steps:
        (ckpt_dir / f"step{step:08d}").mkdir(parents=True)
        (ckpt_dir / f"step{step:08d}" / checkpointing.STATE).write_text("{}")


def test_pruning_keeps_the_checkpoint_just_written_over_stale_later_ones(tmp_path):
    # An earlier run reached step 300; its `latest` was removed and a new run saves step 100.
    _complete(tmp_path, 200, 300, 100)
    (tmp_path / "step00000400").mkdir()  # partial (no state file): left for a resume to overwrite
    checkpointing._prune(tmp_path, "step00000100", keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000100", "step00000400"]


def test_pruning_keeps_the_newest_keep_last(tmp_path):
    _complete(tmp_path, 3, 6, 9, 12)
    checkpointing._prune(tmp_path, "step00000012", keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000009", "step00000012"]


def test_latest_naming_a_missing_checkpoint_is_refused_in_one_line(tmp_path):
    (tmp_path / "latest").write_text("step00000100\n")
    with pytest.raises(ConfigError, match="names step00000100, which is missing or incomplete"):
        checkpointing.load(None, tmp_path, {"tp": 1})


def test_a_resume_with_another_model_is_refused_before_loading(tmp_path):
    """Another shape failed inside DeepSpeed's load with a traceback; another attention math (a
    softmax scale) resumed silently. Settings only a fresh start reads may change."""
    import dataclasses
    import json

    from drope_megatron.config import ModelConfig
    from drope_megatron.train.loop import model_layout

    m = ModelConfig(num_layers=2, hidden_size=64)
    _complete(tmp_path, 100)
    (tmp_path / "step00000100" / checkpointing.STATE).write_text(json.dumps({"step": 100, **model_layout(m)}))
    (tmp_path / "latest").write_text("step00000100\n")
    for change, said in [({"qk_norm": True}, "model.qk_norm=False now True"),
                         ({"softmax_scale": 0.5}, "model.softmax_scale=None now 0.5"),
                         ({"rope_scaling": dataclasses.replace(m.rope_scaling, type="linear", factor=2.0)},
                          "model.rope_scaling=")]:
        with pytest.raises(ConfigError, match=f"written with other settings \\({said}"):
            checkpointing.load(None, tmp_path, model_layout(dataclasses.replace(m, **change)))
    same = model_layout(dataclasses.replace(m, fused_kernels=False, init_method_std=0.01, phase="drope"))
    assert same == model_layout(m)


def test_bf16_zero1_resumes_its_fp32_accumulating_optimizer(megatron_world, tmp_path):
    import torch

    from drope_megatron.config import TrainConfig
    from drope_megatron.train.engine import deepspeed_config, initialize
    from tests.helpers import batch, tiny_model

    config = deepspeed_config(TrainConfig(zero_stage=1, precision="bf16", micro_batch_size=2, global_batch_size=4),
                              dp=1)

    def engine(seed):
        model, recipe = tiny_model(seed=seed)
        return initialize(model.bfloat16(), recipe.train, config), recipe

    def step(e, recipe):
        tokens, positions = batch(recipe)
        for _ in range(2):
            loss = e(tokens[:, :-1], positions[:, :-1], None, labels=tokens[:, 1:]).float().mean()
            e.backward(loss)
            e.step()
        return loss.item()

    first, recipe = engine(0)
    step(first, recipe)
    checkpointing.save(first, tmp_path, 1, 0, {"tp": 1}, 2, {})
    second, _ = engine(1)  # other weights until the checkpoint loads
    assert checkpointing.load(second, tmp_path, {"tp": 1})["step"] == 1
    assert step(first, recipe) == step(second, recipe)  # weights and fp32 optimizer state came back
    for a, b in zip(first.module.parameters(), second.module.parameters()):
        assert torch.equal(a, b)


def test_a_resume_checks_every_model_setting_but_those_that_may_change():
    """Only what a recalibration may change between runs escapes the check (the phase is checked
    on its own): another RoPE base or rope_layers would silently train another model."""
    import dataclasses

    from drope_megatron.config import ModelConfig
    from drope_megatron.train.loop import model_layout

    may_change = {"phase", "fused_kernels", "attention_backend", "params_dtype", "init_method_std"}
    assert set(model_layout(ModelConfig())) == {f"model.{f.name}" for f in dataclasses.fields(ModelConfig)
                                                if f.name not in may_change}

"""A recipe's model over the checkpoint its run starts from: the checkpoint's architecture, the
recipe's context, phase and runtime options; a model key that disagrees is refused, not ignored."""

from __future__ import annotations

import pytest
import yaml

from drope_megatron import checkpoint, distributed
from drope_megatron.config import ConfigError, load_recipe, recipe_to_dict
from tests.helpers import TINY, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_world")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny model (hidden 64, 4 heads in 2 query groups, FFN 192 derived, context 32), a copy
    saved with QK-norm, a softmax scale and the length-aware temperature, a 6-layer one (phase
    layers, RoPE in layer 2) and one with linear RoPE scaling."""
    root = tmp_path_factory.mktemp("init")
    model, recipe = tiny_model()
    tuned = tiny_model("model.qk_norm=true", "model.softmax_scale=0.5", "model.attention_temperature=log_length")
    deep = tiny_model("model.num_layers=6", "model.phase=layers", "model.rope_layers=[2]")
    scaled = tiny_model("model.rope_scaling.type=linear", "model.rope_scaling.factor=2")
    with distributed.session(single=True):
        checkpoint.save(scaled[0], scaled[1].model, root / "scaled")
        checkpoint.save(model, recipe.model, root / "plain")
        checkpoint.save(deep[0], deep[1].model, root / "deep")
        checkpoint.save(tuned[0], tuned[1].model, root / "tuned")
    return root


def load(path, *overrides, resolve_init=True):
    return load_recipe(None, [f"train.init_from={path}", *overrides], resolve_init=resolve_init)


def test_the_checkpoint_decides_what_the_recipe_leaves_out(ckpt, tmp_path):
    m = load(ckpt / "plain").model  # the recipe writes no model key: none of the defaults (hidden 256) count
    stored = checkpoint.model_config(ckpt / "plain")
    assert (m.hidden_size, m.num_layers, m.groups, m.ffn_size, m.seq_length) == (64, 2, 2, 192, 32)
    assert m.padded_vocab_size == stored.padded_vocab_size
    m = load(ckpt / "plain", "model.seq_length=128", "model.phase=drope", "model.attention_backend=megatron",
             "model.fused_kernels=false").model
    assert (m.seq_length, m.phase, m.attention_backend, m.fused_kernels, m.hidden_size) == (128, "drope", "megatron",
                                                                                             False, 64)
    # What `drope config` prints reads back to itself.
    recipe = load(ckpt / "tuned", "model.phase=layers", "model.rope_layers=[1]")
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe)))
    assert load_recipe(tmp_path / "resolved.yaml") == recipe
    assert (recipe.model.qk_norm, recipe.model.softmax_scale, recipe.model.attention_temperature) == (
        True, 0.5, "log_length")


def test_rope_layers_come_with_the_layers_phase_only(ckpt):
    assert load(ckpt / "deep", "model.phase=layers").model.rope_layers == [2]  # the checkpoint's
    # Before, a drope run from it carried [2] beside phase drope, into `drope config` and its checkpoint.
    assert load(ckpt / "deep", "model.phase=drope").model.rope_layers is None


def test_checks_meet_the_checkpoint_not_the_defaults(ckpt):
    """The defaults have 4 layers: a recipe from a 6-layer checkpoint may keep RoPE in layer 5."""
    assert load(ckpt / "deep", "model.phase=layers", "model.rope_layers=[5]").model.rope_layers == [5]
    with pytest.raises(ConfigError, match="model.rope_layers has \\[6\\], outside 0..5"):
        load(ckpt / "deep", "model.phase=layers", "model.rope_layers=[6]")


def test_keys_that_agree_or_change_nothing_are_accepted(ckpt):
    load(ckpt / "plain", *TINY)  # the checkpoint's own shape, written out
    load(ckpt / "plain", "model.num_query_groups=2", "model.kv_channels=16", "model.ffn_hidden_size=192",
         "model.ffn_hidden_size=null", "model.init_method_std=1", "model.params_dtype=bfloat16",
         "model.padded_vocab_size=null", "model.rope_scaling=null")


@pytest.mark.parametrize("override,message", [
    ("model.num_layers=3", r"model\.num_layers=3, but .*plain has 2: a run from train\.init_from builds that "
                           r"checkpoint's architecture: drop the key or start from another"),
    ("model.num_query_groups=null", r"model\.num_query_groups=null gives 4 query groups, but .*plain has 2 query groups"),
    ("model.ffn_hidden_size=256", r"model\.ffn_hidden_size=256, but .*plain has 192 FFN size"),
    ("model.tie_embeddings=false", r"model\.tie_embeddings=false, but .*plain has true"),
    ("model.rope_scaling.factor=4", r"model\.rope_scaling\.factor=4(\.0)?, but .*scaled has 2\.0: a run from"),
    # The type decides which sub-keys mean anything: it is compared first.
    ("model.rope_scaling={type: yarn, factor: 4, original_max_position_embeddings: 32}",
     r"model\.rope_scaling\.type=yarn, but .*scaled has linear"),
    ("model.rope_scaling.beta_fast=16", r"model\.rope_scaling\.beta_fast=16(\.0)? has no effect: .*scaled has RoPE "
                                       r"scaling linear, which does not read it: drop the key$"),
])
def test_keys_that_disagree_are_refused(ckpt, override, message):
    source = ckpt / ("scaled" if "rope_scaling" in override else "plain")
    with pytest.raises(ConfigError, match=message):
        load(source, override)
    assert load(source, override, resolve_init=False)  # reading the file alone (eval) does not check
    assert load(ckpt / "scaled", "model.rope_scaling.factor=2", "model.rope_scaling.beta_slow=1")  # they agree


def test_a_stored_temperature_named_when_the_backend_cannot_run_it(ckpt):
    """The temperature comes from the checkpoint: the message names it, not a key the recipe left out."""
    with pytest.raises(ConfigError, match=r"^model\.attention_backend=megatron, but .*tuned uses "
                                          r"attention_temperature=log_length, which needs attention_backend=sdpa"):
        load(ckpt / "tuned", "model.attention_backend=megatron")
    with pytest.raises(ConfigError, match=r"^model\.attention_temperature needs model\.attention_backend=sdpa"):
        load(ckpt / "tuned", "model.attention_backend=megatron", "model.attention_temperature=log_length")


@pytest.mark.parametrize("override", ["model.qk_norm=false", "model.softmax_scale=null",
                                      "model.attention_temperature=none"])
def test_unsetting_what_the_checkpoint_has_is_refused(ckpt, override):
    with pytest.raises(ConfigError, match=r"but .*tuned (has|uses) .*(drop the key)"):
        load(ckpt / "tuned", override)


def test_before_the_checkpoint_exists_the_recipe_is_as_written(tmp_path):
    assert load(tmp_path / "later", "model.seq_length=64").model.hidden_size == 256

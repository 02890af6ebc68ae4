"""Recipes: typed loading, dotted overrides, and one-line errors for bad input."""

import pytest
import yaml

from drope_megatron.config import ConfigError, Recipe, load_recipe, parse_length
from tests.helpers import ROOT, drope


def test_defaults_validate():
    recipe = load_recipe(None)
    assert recipe == Recipe()
    assert (recipe.model.phase, recipe.train.schedule, recipe.train.zero_stage) == ("rope", "constant", 0)


def test_every_shipped_recipe_loads():
    recipes = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(path)


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_layers": 6, "rope_scaling": {"type": "linear", "factor": 2}}}))
    r = load_recipe(path, ["train.lr=1e-4", "model.rope_layers=[0, 5]", "model.phase=layers",
                           "model.qk_norm=true", "model.softmax_scale=0.125"])
    assert r.model.num_layers == 6
    assert r.model.rope_scaling.factor == 2.0 and isinstance(r.model.rope_scaling.factor, float)
    assert r.train.lr == pytest.approx(1e-4)
    assert r.model.rope_layers == [0, 5] and r.model.phase == "layers"
    assert r.model.qk_norm is True and r.model.softmax_scale == 0.125
    # Bounds are inclusive where a run can use them; a path keeps the text YAML would read as octal.
    r = load_recipe(None, ["train.steps=10", "train.warmup_steps=10", "train.schedule=cosine",
                           "train.min_lr_ratio=1", "model.padded_vocab_size=8192", "train.save_dir=runs/0123"])
    assert (r.train.warmup_steps, r.train.min_lr_ratio, r.model.padded_vocab_size) == (10, 1.0, 8192)
    assert load_recipe(None, ["train.save_dir=0123"]).train.save_dir == "0123"


def test_an_empty_section_is_its_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  num_layers: 3\neval:\n  # every key commented out\n")
    assert load_recipe(path).eval == Recipe().eval
    assert load_recipe(path, ["eval.seed=5"]).eval.seed == 5


def test_derived_sizes():
    m = load_recipe(None, ["model.hidden_size=256", "model.num_attention_heads=8"]).model
    assert m.head_dim == 32 and m.groups == 8 and m.ffn_size % 64 == 0 and m.ffn_size >= 8 * 256 // 3


def test_token_counts_may_be_numbers():
    assert load_recipe(None, ["eval.lengths=[1x, 8192]"]).eval.lengths == ["1x", "8192"]


def test_parse_length():
    assert parse_length("4x", 256) == 1024
    assert parse_length("0.5x", 256) == 128
    assert parse_length("8192", 256) == 8192
    with pytest.raises(ConfigError):
        parse_length("4y", 256)


BAD = [
    (["data.shuffle_window=-1"], "data.shuffle_window must be >= 0"),
    (["train.log_interval=0"], "train.log_interval=0 must be positive"),
    (["train.lr=nan"], "train.lr must be float"),
    (["train.lr=inf"], "train.lr must be float"),
    (["model.hiden_size=64"], "model.hiden_size (did you mean model.hidden_size?)"),
    (["optimizer.lr=1"], "unknown key optimizer"),
    (["model.num_layers=abc"], "model.num_layers must be int"),
    (["model.qk_norm=maybe"], "model.qk_norm must be bool"),
    (["model.num_attention_heads=6", "model.num_query_groups=4", "model.kv_channels=32"],
     "model.num_attention_heads=6 is not divisible by model.num_query_groups=4"),
    (["model.num_query_groups=2", "parallel.tensor_model_parallel_size=4"],
     "model.num_query_groups=2 is not divisible by parallel.tensor_model_parallel_size=4"),
    (["model.hidden_size=100", "model.num_attention_heads=3"], "model.hidden_size=100 is not divisible"),
    (["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"], "model.num_layers=3 is not divisible"),
    (["model.phase=nope"], "model.phase='nope' is not one of rope, drope, layers"),
    (["model.phase=layers"], "model.phase=layers needs model.rope_layers"),
    (["model.rope_layers=[0,9]"], "model.rope_layers has [9]"),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4"], "original_max_position_embeddings"),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
      "model.rope_scaling.original_max_position_embeddings=0"], "needs a positive model.rope_scaling.original_max"),
    # Sub-keys the type does not read, and zero sizes: before, accepted and ignored (0 meant "derive it").
    (["model.rope_scaling.factor=8"], "model.rope_scaling.factor=8.0 has no effect with model.rope_scaling.type=none"),
    (["model.rope_scaling.type=linear", "model.rope_scaling.factor=2", "model.rope_scaling.beta_fast=8"],
     "model.rope_scaling.beta_fast=8.0 has no effect with model.rope_scaling.type=linear"),
    (["model.ffn_hidden_size=0"], "model.ffn_hidden_size=0 must be positive"),
    (["model.kv_channels=0"], "model.kv_channels=0 must be positive"),
    (["model.hidden_size=2"], "model.hidden_size / num_attention_heads=0 must be positive"),
    (["model.attention_backend=megatron", "model.attention_temperature=log_length"],
     "model.attention_temperature needs model.attention_backend=sdpa"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size=10 is not a multiple"),
    (["train.lr=-1"], "train.lr=-1.0 must be positive"),
    (["eval.lengths=[4y]"], "eval.lengths entry '4y'"),
    (["eval.lengths=[infx]"], "eval.lengths entry 'infx'"),
    (["model.norm_epsilon=0"], "model.norm_epsilon=0.0 must be positive"),
    (["train.zero_stage=4"], "train.zero_stage=4 must be 0, 1, 2 or 3"),
    (["train.schedule=wsd", "train.steps=10"], "train.schedule=wsd needs train.decay_steps >= 1"),
    (["recipes/demo-cpu.yaml", "model.phase"], "override 'model.phase' is not key=value"),
    (["model.num_layers.deep=1"], "model.num_layers must be int"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_overrides_fail_with_one_line(overrides, message):
    proc = drope("config", *overrides, timeout=60)
    assert proc.returncode == 2, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("drope: error: ") and message in lines[0], lines[0]
    assert proc.stdout == ""


# Values libraries would refuse only mid-run (with a traceback), or read as nothing: refused up front.
REFUSED = [
    (["train.adam_beta2=1.0"], "train.adam_beta1 and train.adam_beta2 must be within [0, 1)"),
    (["train.adam_eps=-1"], "train.adam_eps and train.weight_decay must be >= 0"),
    (["train.weight_decay=-0.1"], "train.adam_eps and train.weight_decay must be >= 0"),
    (["train.seed=-1"], "train.seed=-1 must be within [0, 2**63)"),
    (["eval.seed=99999999999999999999999"], "eval.seed=99999999999999999999999 must be within [0, 2**63)"),
    (["eval.lengths=[2x,2x]"], "eval.lengths repeats an entry: ['2x', '2x']"),
    (["model.init_method_std=-0.02"], "model.init_method_std=-0.02 must be >= 0"),
    (["train.schedule=cosine", "train.decay_steps=5"], "train.decay_steps=5 has no effect with train.schedule=cosine"),
    (["train.min_lr_ratio=0.5"], "train.min_lr_ratio=0.5 has no effect with train.schedule=constant"),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.factor=8",
      "model.rope_scaling.original_max_position_embeddings=16", "model.rope_scaling.low_freq_factor=0"],
     "needs 0 < low_freq_factor < high_freq_factor (has 0.0 and 4.0"),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
      "model.rope_scaling.original_max_position_embeddings=16", "model.rope_scaling.beta_fast=0.5"],
     "needs 0 < beta_slow < beta_fast (has 1.0 and 0.5"),
    (["train.steps=10", "train.warmup_steps=11"], "train.warmup_steps + train.decay_steps exceed train.steps=10"),
    (["train.schedule=cosine", "train.min_lr_ratio=1.5"], "train.min_lr_ratio must be within [0, 1]"),
    (["model.vocab_size=8192", "model.padded_vocab_size=8191"], "model.padded_vocab_size=8191 must be >="),
]


@pytest.mark.parametrize("overrides,message", REFUSED, ids=[r[1][:40] for r in REFUSED])
def test_values_no_run_can_use_are_refused(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_recipe(None, overrides)
    assert message in str(info.value)


def test_bad_recipe_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  num_layers: [1,\n")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x81\xfe\x00PK")
    cases = [(tmp_path / "missing.yaml", "does not exist"), (broken, "is not valid YAML"),
             (listy, "must be a mapping of sections"), (binary, "cannot be read as text (UnicodeDecodeError)"),
             (tmp_path, "does not exist")]
    for path, message in cases:
        proc = drope("config", str(path), timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_a_stored_model_is_read_as_saved():
    """An unread scaling sub-key is refused in a recipe, not in a checkpoint saved before that rule."""
    from drope_megatron.config import ModelConfig, RopeScalingConfig, validate

    validate(Recipe(model=ModelConfig(rope_scaling=RopeScalingConfig(type="none", factor=4.0))))
    for init in ([], ["train.init_from=/not/yet/a/checkpoint"]):  # the latter builds the recipe's model too
        with pytest.raises(ConfigError, match="model.rope_scaling.factor=4.0 has no effect"):
            load_recipe(None, ["model.rope_scaling.factor=4", *init])


def test_a_recipe_path_with_an_equals_sign_is_the_recipe(tmp_path):
    # A sweep folder such as lr=1e-4/: before, its recipe was taken for an override of key "/tmp/.../lr".
    recipe = tmp_path / "lr=1e-4" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text("train:\n  lr: 1.0e-4\n")
    proc = drope("config", str(recipe), "train.steps=5", timeout=60)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["lr"] == pytest.approx(1e-4) and printed["train"]["steps"] == 5
    missing = drope("config", str(tmp_path / "lr=2" / "r.yaml"), timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stderr


def test_an_existing_file_named_like_an_override_is_the_recipe(tmp_path, monkeypatch, capsys):
    from drope_megatron.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr=3.yaml").write_text("train:\n  steps: 7\n")
    assert main(["config", "lr=3.yaml", "train.lr=2e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 7 and printed["train"]["lr"] == pytest.approx(2e-4)


def test_config_prints_resolved_yaml():
    proc = drope("config", "recipes/demo-cpu.yaml", "train.lr=2e-4", timeout=60)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["lr"] == pytest.approx(2e-4)
    assert load_recipe(ROOT / "recipes/demo-cpu.yaml").model.num_layers == printed["model"]["num_layers"]


def test_config_says_when_the_checkpoint_to_start_from_is_not_there_yet(tmp_path):
    proc = drope("config", f"train.init_from={tmp_path / 'later'}", timeout=60)
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout)["model"]["hidden_size"] == 256
    assert f"note: train.init_from {tmp_path / 'later'} is not a checkpoint (yet): the model below is the recipe's" \
        in proc.stderr


def test_config_says_when_the_deepspeed_json_is_not_there_from_here(tmp_path):
    """Training refuses it; a job queued on a cluster would learn that only once it starts."""
    proc = drope("config", "recipes/paper/smollm_360m.yaml", "train.init_from=null", timeout=60)
    assert proc.returncode == 0 and "deepspeed_config" not in proc.stderr, proc.stderr  # its JSON is there
    proc = drope("config", f"train.deepspeed_config={tmp_path / 'zero9.json'}", timeout=60)
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout)["train"]["deepspeed_config"].endswith("zero9.json")
    assert f"note: train.deepspeed_config {tmp_path / 'zero9.json'} is not a file from here" in proc.stderr

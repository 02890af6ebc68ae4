"""HF -> Megatron -> HF for every family, GQA and MHA, tied and untied: logits and bytes."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from drope_megatron.config import ConfigError
from drope_megatron.convert.hf_to_megatron import convert
from drope_megatron.convert.megatron_to_hf import export
from drope_megatron import checkpoint
from drope_megatron.convert.safetensors_io import SafetensorsReader
from tests.convert.hf_models import FAMILY_EXTRAS, hf_config, megatron_logits, save_hf_model

pytestmark = pytest.mark.usefixtures("megatron_world")
CASES = [(f, gqa, tied) for f in FAMILY_EXTRAS for gqa in (True, False) for tied in (True, False)]


def weights(folder):
    files = sorted(folder.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def round_trip(tmp_path, cfg, dtype=torch.float32):
    hf_dir, meg_dir, out_dir = tmp_path / "hf", tmp_path / "meg", tmp_path / "out"
    model = save_hf_model(hf_dir, cfg, dtype)
    convert(hf_dir, meg_dir, show_progress=False)
    export(meg_dir, out_dir, show_progress=False)
    return model, hf_dir, meg_dir, out_dir


@pytest.mark.parametrize("family,gqa,tied", CASES, ids=[f"{f}-{'gqa' if g else 'mha'}-{'tied' if t else 'untied'}"
                                                       for f, g, t in CASES])
def test_logits_match_and_export_is_bitwise(tmp_path, family, gqa, tied):
    model, hf_dir, meg_dir, out_dir = round_trip(tmp_path, hf_config(family, gqa=gqa, tied=tied))
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = model(tokens).logits
    ours = megatron_logits(meg_dir, tokens)
    assert theirs.abs().max() > 0.5  # a model whose logits mean something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    before, after = weights(hf_dir), weights(out_dir)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    written = json.loads((out_dir / "config.json").read_text())
    assert written["architectures"] == [type(model).__name__]
    assert written["tie_word_embeddings"] == tied and written["num_key_value_heads"] == (2 if gqa else 4)
    assert checkpoint.model_config(meg_dir).norm_epsilon == 0.05
    from transformers import AutoModelForCausalLM

    with torch.no_grad():  # the exported config computes the same function with the same weights
        assert torch.equal(AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()(tokens).logits, theirs)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
], ids=lambda s: s["rope_type"])
def test_rope_theta_and_scaling_survive(tmp_path, scaling):
    cfg = hf_config("llama", rope_scaling=scaling, rope_theta=50000.0)
    model, _, meg_dir, out_dir = round_trip(tmp_path, cfg)
    m = checkpoint.model_config(meg_dir)
    assert m.rotary_base == 50000.0 and m.rope_scaling.type == scaling["rope_type"]
    tokens = torch.randint(0, 300, (1, 100), generator=torch.Generator().manual_seed(2))  # past 32 positions
    with torch.no_grad():
        theirs = model(tokens).logits
    torch.testing.assert_close(megatron_logits(meg_dir, tokens), theirs, rtol=0, atol=1e-4)
    written = json.loads((out_dir / "config.json").read_text())
    rope = written.get("rope_parameters") or {**written["rope_scaling"], "rope_theta": written["rope_theta"]}
    assert rope["rope_theta"] == 50000.0 and all(rope[k] == v for k, v in scaling.items())
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, theirs)  # the exported config computes the same function


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_kept_not_upcast(tmp_path, dtype):
    _, hf_dir, meg_dir, out_dir = round_trip(tmp_path, hf_config("qwen2"), dtype=dtype)
    assert checkpoint.model_config(meg_dir).params_dtype == str(dtype).removeprefix("torch.")
    after = weights(out_dir)
    assert all(t.dtype == dtype for t in after.values())
    assert all(torch.equal(a, after[k]) for k, a in weights(hf_dir).items())
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")


def test_a_dtype_asked_for_is_the_one_stored(tmp_path):
    """--dtype on either side casts what is written, and the metadata says so."""
    from transformers import AutoModelForCausalLM

    save_hf_model(tmp_path / "hf", hf_config("llama"), torch.bfloat16)
    convert(tmp_path / "hf", tmp_path / "meg", dtype="float32", show_progress=False)
    assert checkpoint.model_config(tmp_path / "meg").params_dtype == "float32"
    export(tmp_path / "meg", tmp_path / "out", show_progress=False)  # the stored fp32 goes out as fp32
    after = weights(tmp_path / "out")
    assert all(t.dtype == torch.float32 for t in after.values())
    assert all(torch.equal(t.float(), after[k]) for k, t in weights(tmp_path / "hf").items())  # bf16 is exact in fp32
    export(tmp_path / "meg", tmp_path / "half", dtype="bfloat16", show_progress=False)
    assert all(t.dtype == torch.bfloat16 for t in weights(tmp_path / "half").values())
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "bfloat16"
    tokens = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # loaded alike (a module cast to bf16 would also round its rotary buffer)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(str(tmp_path / "half")).eval()(tokens).logits,
                           AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()(tokens).logits)


def test_sharded_source_and_sharded_export(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = hf_config("llama")
    hf_dir, meg_dir, out_dir = tmp_path / "hf", tmp_path / "meg", tmp_path / "out"
    save_hf_model(hf_dir, cfg)
    AutoModelForCausalLM.from_pretrained(str(hf_dir)).save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    convert(tmp_path / "sharded", meg_dir, show_progress=False)
    export(meg_dir, out_dir, max_shard_bytes=60_000, show_progress=False)
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    mask = os.umask(0)
    os.umask(mask)
    assert {(out_dir / f).stat().st_mode & 0o777 for f in index["weight_map"].values()} == {0o666 & ~mask}
    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir))
    original = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    tokens = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, original(tokens).logits)


def test_tokenizer_and_generation_config_travel(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(299)} | {"[UNK]": 299}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="w1", eos_token="w2")
    hf_dir = tmp_path / "hf"
    save_hf_model(hf_dir, hf_config("llama"))
    tokenizer.save_pretrained(str(hf_dir))
    GenerationConfig(max_new_tokens=7, bos_token_id=1, eos_token_id=2).save_pretrained(str(hf_dir))
    (hf_dir / "chat_template.json").write_text('{"chat_template": "{{ messages[0].content }}"}')  # the older file
    convert(hf_dir, tmp_path / "meg", show_progress=False)
    assert (tmp_path / "meg" / "tokenizer" / "tokenizer.json").is_file()
    export(tmp_path / "meg", tmp_path / "out", show_progress=False)
    again = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert again("w5 w7 w42")["input_ids"] == tokenizer("w5 w7 w42")["input_ids"] == [5, 7, 42]
    assert GenerationConfig.from_pretrained(str(tmp_path / "out")).max_new_tokens == 7
    assert (tmp_path / "out" / "chat_template.json").read_text() == (hf_dir / "chat_template.json").read_text()


def test_a_tied_model_that_also_stores_lm_head_converts_or_is_refused(tmp_path):
    """Some tools save a tied model's lm_head.weight as well: taken when it is the embedding."""
    from safetensors.torch import save_file

    save_hf_model(tmp_path / "hf", hf_config("llama", tied=True))
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    convert(tmp_path / "hf", tmp_path / "meg", show_progress=False)
    weights["lm_head.weight"][0, 0] += 1.0
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="lm_head.weight differs from model.embed_tokens.weight"):
        convert(tmp_path / "hf", tmp_path / "meg2", show_progress=False)


def test_the_dtype_is_the_configs_not_the_first_tensors(tmp_path):
    """A bf16 checkpoint whose first listed tensor is stored in fp32 stays a bf16 model."""
    from safetensors.torch import save_file

    save_hf_model(tmp_path / "hf", hf_config("llama"), dtype=torch.bfloat16)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    first = SafetensorsReader(tmp_path / "hf").names()[0]
    weights[first] = weights[first].float()
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert SafetensorsReader(tmp_path / "hf").dtype() == torch.float32
    convert(tmp_path / "hf", tmp_path / "meg", show_progress=False)
    assert checkpoint.read_meta(tmp_path / "meg")["model"]["params_dtype"] == "bfloat16"

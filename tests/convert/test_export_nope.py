"""DroPE models leave as a stock SmolLM3ForCausalLM with NoPE layers, or not at all."""

import json

import pytest
import torch

from drope_megatron import distributed
from drope_megatron.config import ConfigError, ParallelConfig
from drope_megatron.convert.hf_to_megatron import convert
from drope_megatron.convert.megatron_to_hf import export
from drope_megatron import checkpoint
from tests.convert.hf_models import hf_config, megatron_logits, save_hf_model

pytestmark = pytest.mark.usefixtures("megatron_world")


def dropped(tmp_path, family, phase="drope", rope_layers=None, **cfg):
    """Convert a tiny HF model, switch the Megatron model's phase, save it as a new checkpoint."""
    hf_dir, meg_dir, drope_dir = tmp_path / "hf", tmp_path / "meg", tmp_path / "drope"
    save_hf_model(hf_dir, hf_config(family, **cfg))
    convert(hf_dir, meg_dir, show_progress=False)
    with distributed.session(single=True):
        model, m = checkpoint.load_model(meg_dir, ParallelConfig())
        model.set_phase(phase, rope_layers)
        checkpoint.save(model, m, drope_dir, extra={"source": checkpoint.read_meta(meg_dir)["source"]},
                        tokenizer=meg_dir / "tokenizer")
    return drope_dir


@pytest.mark.parametrize("family,phase,rope_layers", [
    ("llama", "drope", None), ("mistral", "drope", None), ("qwen2", "drope", None), ("llama", "layers", [1]),
    ("smollm3", "drope", None),
])
def test_nope_export_loads_with_plain_automodel_and_matches(tmp_path, family, phase, rope_layers):
    from transformers import AutoModelForCausalLM

    drope_dir = dropped(tmp_path, family, phase, rope_layers)
    message = export(drope_dir, tmp_path / "out", show_progress=False)
    assert "SmolLM3ForCausalLM" in message
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()  # no trust_remote_code
    assert type(hf).__name__ == "SmolLM3ForCausalLM"
    expected_flags = [0, 1] if phase == "layers" else [0] * hf.config.num_hidden_layers
    assert hf.config.no_rope_layers == expected_flags
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["eos_token_id"] == 2 and written["bos_token_id"] == 1  # the source's tokens, not SmolLM3's
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf(tokens).logits
    ours = megatron_logits(drope_dir, tokens)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    # and it really is position-free where asked: not the RoPE model's function
    assert (megatron_logits(tmp_path / "meg", tokens) - ours).abs().max() > 1e-3


def test_qwen2_biases_become_attention_bias_with_zero_o_bias_and_convert_back(tmp_path):
    from safetensors.torch import load_file, save_file

    drope_dir = dropped(tmp_path, "qwen2")
    export(drope_dir, tmp_path / "out", show_progress=False)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.all(tensors["model.layers.0.self_attn.o_proj.bias"] == 0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attention_bias"] is True
    # A published DroPE Qwen2 comes back in (to train it further) as the same model.
    convert(tmp_path / "out", tmp_path / "back", show_progress=False)
    tokens = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(megatron_logits(tmp_path / "back", tokens), megatron_logits(drope_dir, tokens),
                               rtol=0, atol=1e-5)
    tensors["model.layers.1.self_attn.o_proj.bias"][0] = 0.5  # a real o_proj bias has no place: refused
    save_file(tensors, str(tmp_path / "out" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="model.layers.1.self_attn.o_proj.bias is not zero"):
        convert(tmp_path / "out", tmp_path / "again", show_progress=False)
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("family,arch,message", [
    ("llama", "source", "LlamaForCausalLM cannot express"),
    # Either way the same reason (before, --arch source pointed to --arch nope, which refused too).
    ("qwen3", "nope", "per-head q/k norms (Qwen3), which no stock transformers architecture has without RoPE"),
    ("qwen3", "source", "per-head q/k norms (Qwen3), which no stock transformers architecture has without RoPE"),
])
def test_inexpressible_exports_are_refused_and_leave_nothing(tmp_path, family, arch, message):
    drope_dir = dropped(tmp_path, family)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export(drope_dir, tmp_path / "out", arch=arch, show_progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("setting,message", [
    ("model.qk_norm=true", "QK-norm DroPE variant"),
    ("model.softmax_scale=0.2", r"model.softmax_scale=0.2 differs from head_dim\*\*-0.5"),  # head_dim 16: 0.25
    ("model.attention_temperature=log_length", "attention_temperature is an inference option"),
])
def test_functions_no_stock_architecture_computes_are_refused(tmp_path, setting, message):
    from drope_megatron.config import load_recipe
    from drope_megatron.model import build_model

    recipe = load_recipe(None, ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                                "model.vocab_size=128", setting, "model.phase=drope"])
    with distributed.session(single=True):
        checkpoint.save(build_model(recipe.model, recipe.parallel), recipe.model, tmp_path / "own")
    with pytest.raises(ConfigError, match=message):
        export(tmp_path / "own", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_drope_model_trained_here_exports_without_foreign_token_ids(tmp_path):
    from transformers import AutoModelForCausalLM

    from drope_megatron.config import load_recipe
    from drope_megatron.model import build_model

    recipe = load_recipe(None, ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                                "model.vocab_size=100", "model.init_method_std=0.1", "model.phase=drope"])
    with distributed.session(single=True):
        checkpoint.save(build_model(recipe.model, recipe.parallel), recipe.model, tmp_path / "own")
    export(tmp_path / "own", tmp_path / "out", show_progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written.get("pad_token_id") is None and written.get("eos_token_id") is None
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    tokens = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(megatron_logits(tmp_path / "own", tokens), hf(tokens).logits, rtol=0, atol=1e-4)


def test_a_model_trained_here_takes_its_token_ids_from_its_tokenizer(tmp_path):
    """Without them `generate` would never stop: the export's config has the tokenizer's EOS."""
    import sentencepiece

    from drope_megatron.config import load_recipe
    from drope_megatron.demo.pipeline import SHIPPED
    from drope_megatron.model import build_model

    sp = sentencepiece.SentencePieceProcessor(model_file=str(SHIPPED / "tokenizer.model"))
    recipe = load_recipe(None, ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                                f"model.vocab_size={sp.get_piece_size()}", "model.phase=drope"])
    with distributed.session(single=True):
        checkpoint.save(build_model(recipe.model, recipe.parallel), recipe.model, tmp_path / "own",
                        tokenizer=SHIPPED / "tokenizer.model")
    export(tmp_path / "own", tmp_path / "out", show_progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["eos_token_id"] == sp.eos_id() and written.get("pad_token_id") is None
    assert written.get("bos_token_id") is None  # the bare .model adds no BOS: training saw none
    # A tokenizer that puts its BOS before every text (as Llama's does): the export says which id.
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="w1 $A", special_tokens=[("w1", 1)])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="w1", eos_token="w2").save_pretrained(
        str(tmp_path / "bos_tokenizer"))
    recipe = load_recipe(None, ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                                "model.vocab_size=100", "model.phase=drope"])
    with distributed.session(single=True):
        checkpoint.save(build_model(recipe.model, recipe.parallel), recipe.model, tmp_path / "bos",
                        tokenizer=tmp_path / "bos_tokenizer")
    export(tmp_path / "bos", tmp_path / "bos_out", show_progress=False)
    written = json.loads((tmp_path / "bos_out" / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"]) == (1, 2)


def test_ids_the_source_leaves_unset_come_from_the_tokenizer(tmp_path):
    """The demo's shipped model has null bos/eos in its config: its DroPE export used to have no EOS."""
    import sentencepiece

    from drope_megatron.demo.pipeline import SHIPPED

    assert json.loads((SHIPPED / "config.json").read_text())["eos_token_id"] is None
    convert(SHIPPED, tmp_path / "meg", dtype="float32", show_progress=False)
    with distributed.session(single=True):
        model, m = checkpoint.load_model(tmp_path / "meg", ParallelConfig())
        model.set_phase("drope")
        checkpoint.save(model, m, tmp_path / "drope", extra={"source": checkpoint.read_meta(tmp_path / "meg")["source"]},
                        tokenizer=tmp_path / "meg" / "tokenizer")
    export(tmp_path / "drope", tmp_path / "out", show_progress=False)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(SHIPPED / "tokenizer.model"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["eos_token_id"] == sp.eos_id() == 2
    # No ids and no tokenizer files (only the source's generation_config.json): exported without ids.
    bare = dropped(tmp_path / "bare", "qwen2", bos_token_id=None, eos_token_id=None)
    assert not (bare / "tokenizer" / "tokenizer_config.json").exists()
    export(bare, tmp_path / "bare_out", show_progress=False)
    assert json.loads((tmp_path / "bare_out" / "config.json").read_text()).get("eos_token_id") is None


def test_model_trained_here_exports_as_llama(tmp_path):
    from transformers import AutoModelForCausalLM

    from drope_megatron.config import load_recipe
    from drope_megatron.model import build_model

    recipe = load_recipe(None, ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                                "model.num_query_groups=2", "model.vocab_size=100", "model.init_method_std=0.1"])
    with distributed.session(single=True):
        checkpoint.save(build_model(recipe.model, recipe.parallel), recipe.model, tmp_path / "own")
    assert "LlamaForCausalLM" in export(tmp_path / "own", tmp_path / "out", show_progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    tokens = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(megatron_logits(tmp_path / "own", tokens), hf(tokens).logits, rtol=0, atol=1e-4)


def test_a_model_folder_given_as_tokenizer_lends_only_its_tokenizer_files(tmp_path):
    """`data.tokenizer` may name a whole Hugging Face model folder: its config and weights must not
    ride along into the checkpoint, nor replace the exported model's own."""
    from transformers import AutoModelForCausalLM

    hf_dir, meg_dir, drope_dir = tmp_path / "hf", tmp_path / "meg", tmp_path / "drope"
    save_hf_model(hf_dir, hf_config("llama"))
    convert(hf_dir, meg_dir, show_progress=False)
    with distributed.session(single=True):
        model, m = checkpoint.load_model(meg_dir, ParallelConfig())
        model.set_phase("drope")
        checkpoint.save(model, m, drope_dir, extra={"source": checkpoint.read_meta(meg_dir)["source"]},
                        tokenizer=hf_dir)
    assert {p.name for p in (drope_dir / "tokenizer").iterdir()} == {"generation_config.json"}
    export(drope_dir, tmp_path / "out", show_progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(hf).__name__ == "SmolLM3ForCausalLM"
    tokens = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(megatron_logits(drope_dir, tokens), hf(tokens).logits, rtol=0, atol=1e-4)


def test_qkv_biases_with_head_norms_trained_here_export_to_qwen3_with_attention_bias(tmp_path):
    from transformers import AutoModelForCausalLM

    from drope_megatron.config import load_recipe
    from drope_megatron.model import build_model

    recipe = load_recipe(None, ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                                "model.num_query_groups=2", "model.vocab_size=100", "model.init_method_std=0.1",
                                "model.qk_head_norm=true", "model.qkv_bias=true"])
    with distributed.session(single=True):
        model = build_model(recipe.model, recipe.parallel)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)  # megatron starts biases at 0: make them matter
        checkpoint.save(model, recipe.model, tmp_path / "own")
    assert "Qwen3ForCausalLM" in export(tmp_path / "own", tmp_path / "out", show_progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attention_bias"] is True
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    tokens = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(megatron_logits(tmp_path / "own", tokens), hf(tokens).logits, rtol=0, atol=1e-4)

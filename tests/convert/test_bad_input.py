"""Bad input to `drope convert`: one clear line, exit 2, no output folder, no leftovers."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tests.convert.hf_models import hf_config, save_hf_model
from tests.helpers import drope


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "hf"
    save_hf_model(folder, hf_config("llama"))
    return folder


def broken_copy(good_hf, tmp_path, breakage):
    folder = tmp_path / "src"
    shutil.copytree(good_hf, folder)
    breakage(folder)
    return folder


def edit_config(**changes):
    def apply(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return apply


def truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])


def corrupt_header(folder):
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:40] = b"x" * 32
    (folder / "model.safetensors").write_bytes(bytes(data))


def shard_missing(folder):
    weights = {"lm_head.weight": torch.zeros(1)}
    save_file(weights, str(folder / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def truncated_index(folder):
    shard_missing(folder)
    text = (folder / "model.safetensors.index.json").read_text()
    (folder / "model.safetensors.index.json").write_text(text[: len(text) // 2])  # an interrupted download


def only_pickle(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def extra_tensor(folder):
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def float64_weights(folder):
    from safetensors.torch import load_file

    weights = {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    edit_config(dtype=None, torch_dtype=None)(folder)


CASES = {
    "unsupported-architecture": (edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]), [],
                                 "unsupported architecture model_type='gpt2'"),
    "truncated-shard": (truncate, [], "is corrupt or truncated"),
    "corrupt-header": (corrupt_header, [], "is corrupt or truncated"),
    "missing-shard": (shard_missing, [], "shard model-00002-of-00002.safetensors listed in"),
    "pickle-only": (only_pickle, [], "not loaded (unsafe)"),
    "truncated-index": (truncated_index, [], "model.safetensors.index.json is damaged (JSONDecodeError"),
    "config-not-json": (lambda f: (f / "config.json").write_text("{not json"), [],
                        "config.json cannot be read by transformers"),
    "shape-mismatch": (edit_config(intermediate_size=80), [], "has shape [96, 64] but config.json implies [80, 64]"),
    "groups-vs-tp": (lambda f: None, ["--tp", "4"], "num_key_value_heads=2 is not divisible by --tp=4"),
    "gelu": (edit_config(hidden_act="gelu"), [], "hidden_act='gelu' is not supported"),
    "field-type": (edit_config(hidden_size="64"), [], "config.json cannot be read by transformers"),
    "float64-no-dtype": (float64_weights, [], "the weights are torch.float64 and config.json names no dtype: pass "
                                              "--dtype"),
    "unknown-tensor": (extra_tensor, [], "have no place in the model, e.g. model.layers.0.self_attn.o_proj.bias"),
    "sliding-window": (edit_config(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=16),
                       [], "pass --ignore-sliding-window"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_source_is_refused_cleanly(good_hf, tmp_path, case, capsys):
    from drope_megatron.cli import main

    breakage, args, message = CASES[case]
    src = broken_copy(good_hf, tmp_path, breakage)
    dst = tmp_path / "out" / "meg"
    # The real command line in this process (a child per case only re-imports; exit codes through a
    # process boundary are checked by the tests below).
    assert main(["convert", "hf-to-megatron", str(src), str(dst), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("drope: error: ") and message in lines[0], err[-2000:]
    assert not dst.exists()
    assert not (dst.parent.exists() and any(dst.parent.iterdir())), list(dst.parent.iterdir())


def test_existing_output_needs_overwrite(good_hf, tmp_path, capsys):
    from drope_megatron.cli import main

    dst = tmp_path / "meg"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    proc = drope("convert", "hf-to-megatron", str(good_hf), str(dst), "--quiet")
    assert proc.returncode == 2 and "already exists: pass --overwrite" in proc.stderr
    assert (dst / "keep.txt").read_text() == "mine"
    # --overwrite replaces a folder this command wrote, never one of other files (in this process from here).
    assert main(["convert", "hf-to-megatron", str(good_hf), str(dst), "--quiet", "--overwrite"]) == 2
    assert "holds other files (no drope_checkpoint.json" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"
    (dst / "keep.txt").unlink()
    for _ in range(2):  # into the empty folder, then over its own output
        assert main(["convert", "hf-to-megatron", str(good_hf), str(dst), "--quiet", "--overwrite"]) == 0
        assert (dst / "drope_checkpoint.json").is_file()
    out = tmp_path / "hf_out"
    out.mkdir()
    proc = drope("convert", "megatron-to-hf", str(dst), str(out), "--quiet")
    assert proc.returncode == 2 and "already exists: pass --overwrite" in proc.stderr
    # A model folder of its own (a config.json beside other files, the source's, say) is not an export.
    (out / "config.json").write_text("{}")
    (out / "README.md").write_text("mine")
    assert main(["convert", "megatron-to-hf", str(dst), str(out), "--quiet", "--overwrite"]) == 2
    assert "holds other files (files this command does not write" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "mine"
    # Nor the current folder (without --overwrite here: this test must not risk the repository).
    assert main(["convert", "megatron-to-hf", str(dst), ".", "--quiet"]) == 2
    assert ". is (or holds) the current folder" in capsys.readouterr().err


def test_zero_tp_is_refused(good_hf, tmp_path):
    proc = drope("convert", "hf-to-megatron", str(good_hf), str(tmp_path / "m"), "--tp", "0", "--quiet")
    assert proc.returncode == 2 and "--tp=0 must be positive" in proc.stderr


def test_damaged_checkpoints_and_bad_verify_input(good_hf, tmp_path, capsys):
    from drope_megatron.cli import main

    def drope_here(*args: str) -> tuple[int, str]:  # the command line in this process: no re-imports
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    meg = tmp_path / "meg"
    assert drope_here("convert", "hf-to-megatron", good_hf, meg, "--quiet")[0] == 0
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    shutil.copy(good_hf / "config.json", no_weights)
    code, err = drope_here("convert", "verify", no_weights, meg)
    assert code == 2 and "has no model.safetensors" in err
    code, err = drope_here("convert", "verify", good_hf, meg, "--length", "0")
    assert code == 2 and "--length must be at least 1" in err
    other = tmp_path / "other"  # the wrong folder: another vocabulary (before: an IndexError inside the HF model)
    save_hf_model(other, hf_config("llama", vocab_size=256))
    code, err = drope_here("convert", "verify", other, meg)
    assert code == 2 and f"{other} has vocab_size=256 but {meg} has vocab_size=300" in err
    broken = tmp_path / "broken"
    shutil.copytree(meg, broken)
    shutil.rmtree(broken / "weights")
    code, err = drope_here("convert", "megatron-to-hf", broken, tmp_path / "out1", "--quiet")
    assert code == 2 and "is missing or incomplete" in err
    (broken / "drope_checkpoint.json").write_text("{not json")
    code, err = drope_here("convert", "megatron-to-hf", broken, tmp_path / "out2", "--quiet")
    assert code == 2 and "is not valid JSON" in err
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
    # NaN logits are a failed comparison, not a pass (NaN > atol is False); a child process, as
    # verify's exit status 1 is checked through a process boundary here.
    from safetensors.torch import load_file, save_file

    nan = tmp_path / "nan"
    shutil.copytree(good_hf, nan)
    tensors = load_file(nan / "model.safetensors")
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    proc = drope("convert", "verify", str(nan), str(meg))
    assert proc.returncode == 1 and "logits differ by nan" in proc.stderr, proc.stderr[-500:]


def test_export_of_a_non_checkpoint_is_refused(tmp_path):
    proc = drope("convert", "megatron-to-hf", str(tmp_path), str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 2 and "is not a drope Megatron checkpoint" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_qwen_window_counts_only_where_a_layer_slides():
    """Qwen2/3 slide only in layers past max_window_layers: with none there, the model is full attention."""
    from drope_megatron.config import ConfigError
    from drope_megatron.convert.families import family_for
    from drope_megatron.convert.hf_config import model_config_from_hf

    full = hf_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2)  # both layers full
    assert model_config_from_hf(full, family_for("qwen2")).num_layers == 2
    sliding = hf_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    with pytest.raises(ConfigError, match="uses sliding-window attention"):
        model_config_from_hf(sliding, family_for("qwen2"))

"""`drope convert verify` on real torchrun processes: a converted checkpoint loads at TP=2,
PP=2 and TP=2 x PP=2 and gives the Hugging Face model's logits."""

import json

import pytest

from drope_megatron.convert.hf_to_megatron import convert
from tests.convert.hf_models import hf_config, save_hf_model
from tests.helpers import drope, torchrun

# Mistral is Llama's layout (covered in-process at TP=1); each other family runs at TP=2.
# qwen3 at PP=2 is tied, as small Qwen3 models are: the last stage reads its output layer from the embedding.
LAYOUTS = [("llama", 2, 1, False), ("qwen2", 2, 1, False), ("qwen3", 2, 1, False), ("smollm3", 2, 1, False),
           ("qwen3", 1, 2, True), ("smollm3", 2, 2, False)]


@pytest.mark.parametrize("family,tp,pp,tied", LAYOUTS,
                         ids=[f"{f}-tp{t}-pp{p}" + ("-tied" if tie else "") for f, t, p, tie in LAYOUTS])
def test_verify_at_parallel_layouts(megatron_world, tmp_path, family, tp, pp, tied):
    hf_dir, meg_dir = tmp_path / "hf", tmp_path / "meg"
    save_hf_model(hf_dir, hf_config(family, tied=tied, num_hidden_layers=4))
    convert(hf_dir, meg_dir, tp=tp, pp=pp, show_progress=False)  # in-process; the CLI path is tested below
    report = tmp_path / "verify.json"
    proc = torchrun(tp * pp, ["-m", "drope_megatron.cli", "convert", "verify", str(hf_dir), str(meg_dir),
                              "--tp", str(tp), "--pp", str(pp), "--length", "48", "--report", str(report)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert (result["tp"], result["pp"]) == (tp, pp)
    assert result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0
    assert "max |diff|" in proc.stdout


def test_verify_fails_on_a_different_model(tmp_path):
    save_hf_model(tmp_path / "a", hf_config("llama"), seed=0)
    save_hf_model(tmp_path / "b", hf_config("llama"), seed=1)
    assert drope("convert", "hf-to-megatron", str(tmp_path / "a"), str(tmp_path / "meg"), "--quiet").returncode == 0
    proc = drope("convert", "verify", str(tmp_path / "b"), str(tmp_path / "meg"))
    assert proc.returncode == 1
    assert "logits differ by" in proc.stderr and "> --atol 0.0001" in proc.stderr

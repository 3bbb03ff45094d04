"""The LoRA variants (lora.use_dora, use_rslora, init, modules_to_save) train through the stage,
and the adapter each writes holds what the variant implies. All through peft's LoraConfig."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import run, set_params
from qlora.params import ParamsError, parse_params


def train(project, change):
    set_params(project / "params.yaml", change)
    run(["python", "-m", "stages.train"], project)
    adapter = project / "models/adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    return config, load_file(adapter / "adapter_model.safetensors")


def built(project, change, monkeypatch):
    """The stage's trainer for these params, before any step (its LoRA weights as initialised)."""
    from stages.train import build_trainer

    set_params(project / "params.yaml", change)
    monkeypatch.chdir(project)
    return build_trainer(parse_params(project / "params.yaml"), project / "scratch")


def lora_layer(model):
    return next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))


def test_dora_writes_a_magnitude_vector_per_adapted_layer(tiny_project):
    config, weights = train(tiny_project, {"lora.use_dora": True})
    assert config["use_dora"]
    magnitudes = [k for k in weights if "lora_magnitude_vector" in k]
    adapted = [k for k in weights if k.endswith("lora_A.weight")]
    assert magnitudes and len(magnitudes) == len(adapted)


def test_rslora_scales_by_alpha_over_the_root_of_r(tiny_project, monkeypatch):
    trainer = built(tiny_project, {"lora.use_rslora": True, "lora.r": 16, "lora.alpha": 8}, monkeypatch)
    assert lora_layer(trainer.model).scaling["default"] == pytest.approx(8 / math.sqrt(16))
    trainer = built(tiny_project, {"lora.use_rslora": False}, monkeypatch)
    assert lora_layer(trainer.model).scaling["default"] == pytest.approx(8 / 16)


def test_modules_to_save_trains_and_saves_the_whole_layer(tiny_project):
    config, weights = train(tiny_project, {"lora.modules_to_save": ["lm_head"]})
    assert config["modules_to_save"] == ["lm_head"]
    assert any("lm_head" in k for k in weights), sorted(weights)[:5]


@pytest.mark.cpu
def test_loftq_is_refused_without_a_gpu(tiny_project, monkeypatch):
    with pytest.raises(ParamsError, match="lora.init loftq needs a CUDA GPU"):  # peft's LoftQ on a 4-bit base: CUDA only
        built(tiny_project, {"lora.init": "loftq"}, monkeypatch)


@pytest.mark.cuda
def test_loftq_starts_closer_to_the_unquantized_weights(tiny_project, monkeypatch):
    trainer = built(tiny_project, {"lora.init": "loftq"}, monkeypatch)
    layer = lora_layer(trainer.model)
    import bitsandbytes.functional as F

    full = load_file(tiny_project / "models/base/model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    weight = layer.base_layer.weight
    quantized = F.dequantize_4bit(weight.data, weight.quant_state).float().cpu()
    update = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).float().cpu() * layer.scaling["default"]
    assert torch.linalg.norm(full.float() - quantized - update) < 0.9 * torch.linalg.norm(full.float() - quantized)


def test_eva_starts_from_orthonormal_directions_of_the_data(tiny_project, monkeypatch):
    trainer = built(tiny_project, {"lora.init": "eva", "lora.r": 4}, monkeypatch)
    a = lora_layer(trainer.model).lora_A["default"].weight.float()
    assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=2e-2), "EVA's A: right singular vectors"


def test_pissa_starts_from_the_weights_svd_and_saves_a_plain_lora(tiny_project, monkeypatch):
    from peft import PeftModel

    from qlora.models import load_model
    from stages.train import save_initial

    change = {"quantize.bits": 16, "quantize.compute_dtype": "float32", "lora.init": "pissa", "lora.r": 4,
              "lora.alpha": 4, "export.dtype": "float32"}
    set_params(tiny_project / "params.yaml", change)
    run(["python", "-m", "stages.quantize"], tiny_project)
    full = load_file(tiny_project / "models/base/model.safetensors")["model.layers.0.self_attn.q_proj.weight"].float()
    trainer = built(tiny_project, change, monkeypatch)
    layer = lora_layer(trainer.model)
    b, a = layer.lora_B["default"].weight.float(), layer.lora_A["default"].weight.float()
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    top = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    assert torch.allclose(b @ a, top, atol=1e-4), "B A is the top-r part of W"
    assert torch.allclose(layer.base_layer.weight.float(), full - top, atol=1e-4), "the base keeps the rest"

    # Trained on the changed base, saved as a plain LoRA (rank 2r) of the unchanged one: the same model.
    initial = save_initial(trainer, parse_params(tiny_project / "params.yaml"), tiny_project / "initial")
    trainer.train()
    batch = {"input_ids": torch.tensor([trainer.eval_dataset[0]["input_ids"]])}
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(**batch).logits
    trainer.model.save_pretrained(tiny_project / "converted", path_initial_model_for_weight_conversion=initial)
    config = json.loads((tiny_project / "converted/adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    unchanged = PeftModel.from_pretrained(load_model(tiny_project / "models/quantized", "float32"), tiny_project / "converted")
    with torch.no_grad():
        assert torch.allclose(unchanged.eval()(**batch).logits, trained, atol=1e-3)

    # Through the stages: evaluate reads the unchanged base + that adapter, export merges it and agrees.
    run(["python", "-m", "stages.train"], tiny_project)
    run(["python", "-m", "stages.evaluate"], tiny_project)
    run(["python", "-m", "stages.export"], tiny_project)
    assert json.loads((tiny_project / "metrics/export.json").read_text())["merge_max_abs_diff"] < 1e-4


def test_init_that_needs_full_precision_is_refused_on_a_4_bit_base(tiny_project):
    set_params(tiny_project / "params.yaml", {"lora.init": "pissa"})
    with pytest.raises(ParamsError, match="lora.init must be an init that works on a 4-bit base: pissa takes"):
        parse_params(tiny_project / "params.yaml")
    set_params(tiny_project / "params.yaml", {"lora.init": "loftq", "quantize.bits": 8})
    with pytest.raises(ParamsError, match="loftq offsets the 4-bit quantization error, and quantize.bits is 8"):
        parse_params(tiny_project / "params.yaml")

"""One reduced run of the real default: the bundled SmolLM2-135M, 4-bit NF4, the Debian data.

A few dozen examples and a few steps, through `dvc repro` in a temporary repo, so the
real path (GGUF to safetensors, bitsandbytes on this CPU, SFTTrainer, generation)
cannot break unseen.
"""

import json

from safetensors import safe_open

from conftest import make_project, repro


def test_real_default_pipeline_reduced(tmp_path):
    project = make_project(tmp_path / "real", {
        "data.max_per_label": 5,   # 8 labels: 24 train, 8 val, 8 test
        "train.max_steps": 3,
        "train.batch_size": 4,
        "train.logging_steps": 1,
    })
    assert repro(project) == {"validate", "base", "prepare", "tokenize", "quantize", "train", "evaluate_base", "evaluate", "export"}

    quantize = json.loads((project / "metrics/quantize.json").read_text())
    assert quantize["layers"] == 30 and quantize["hidden_size"] == 576 and quantize["heads"] == 9
    assert 130e6 < quantize["parameters"] < 140e6
    assert quantize["ratio_to_bf16"] < 0.5, "4-bit storage must be well under bf16"

    with safe_open(project / "models/base/model.safetensors", "pt") as f:
        assert "model.layers.29.mlp.down_proj.weight" in f.keys()
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["steps"] == 3 and train["tokens_per_second"] > 0
    assert 0 < train["trainable_fraction"] < 0.02
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    assert 0 <= evaluation["test_accuracy"] <= 1 and evaluation["test_loss"] > 0
    assert evaluation["base_test_accuracy"] == json.loads(
        (project / "metrics/evaluate_base.json").read_text())["test_accuracy"]
    export = json.loads((project / "metrics/export.json").read_text())
    # Stated tolerance, bf16 export vs the 4-bit base + adapter (README, "Export"): the
    # full default measured a max |logit diff| of 1.84, 97.9% same next token.
    assert export["merge_max_abs_diff"] < 1e-3
    assert export["max_abs_logit_diff"] <= 1.5 * export["float32_max_abs_logit_diff"]
    assert export["max_abs_logit_diff"] < 3.0 and export["argmax_agreement"] >= 0.95

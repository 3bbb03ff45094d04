"""One reduced run of the real default: the bundled SmolLM2-135M, 4-bit NF4, the Debian data.

A few dozen examples through `dvc repro` in a temporary repo (conftest.REAL_OVERRIDES), so the
real path (GGUF to safetensors, bitsandbytes on this CPU, SFTTrainer, generation, export)
cannot break unseen. The run is trained long enough to overfit, which tests/test_overfitting.py checks.
"""

import json

from safetensors import safe_open


def test_real_default_pipeline_reduced(real_project):
    project, ran = real_project
    assert ran == {"validate", "base", "prepare", "tokenize", "quantize", "train", "evaluate_base", "evaluate", "export"}

    quantize = json.loads((project / "metrics/quantize.json").read_text())
    assert quantize["layers"] == 30 and quantize["hidden_size"] == 576 and quantize["heads"] == 9
    assert 130e6 < quantize["parameters"] < 140e6
    assert quantize["ratio_to_bf16"] < 0.5, "4-bit storage must be well under bf16"

    with safe_open(project / "models/base/model.safetensors", "pt") as f:
        assert "model.layers.29.mlp.down_proj.weight" in f.keys()
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["steps"] == 64 and train["tokens_per_second"] > 0
    assert 0 < train["trainable_fraction"] < 0.02
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    base = json.loads((project / "metrics/evaluate_base.json").read_text())
    assert base["task"] == "classification" and evaluation["base_test_accuracy"] == base["test_accuracy"]
    # The pretrained model learns the format and most of the task from 16 examples; the base model, asked
    # the same, echoes the prompt (answered 0). On AMD EPYC, on one thread or two, every answer was a label
    # computing in bf16, and all but one in float32 (under the AVX2 cap). At most 2 of 8 may miss the label set.
    assert evaluation["test_answered"] >= 0.75 and evaluation["test_accuracy"] >= 0.5
    assert evaluation["test_answered"] > evaluation["base_test_answered"]
    assert evaluation["test_loss"] < 0.2 * evaluation["base_test_loss"]
    export = json.loads((project / "metrics/export.json").read_text())
    # Stated tolerance, bf16 export vs the 4-bit base + adapter (docs/sharing.md).
    assert export["merge_max_abs_diff"] < 1e-3
    assert export["max_abs_logit_diff"] <= 1.5 * export["float32_max_abs_logit_diff"]
    # Near-tied next tokens flip between bf16 kernels (measured 0.96 on 8 test examples); the
    # stage itself holds the test loss and accuracy to export.*_tolerance.
    assert export["argmax_agreement"] >= 0.9

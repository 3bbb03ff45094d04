"""The export stage: the quantized base dequantized, the adapter merged, saved standalone.

On the tiny model from the reproduced project (4-bit NF4, double quant, bf16 compute).
"""

import json

import pytest
import torch
import yaml

from conftest import repro, run, set_params

# The exported model against the 4-bit base plus adapter, on held-out test prompts. The
# reference computes in bf16 (quantize.compute_dtype), so most of the difference is its own
# rounding: the same model in float32, unmerged, is already that far from it (the noise
# floor: `float32_max_abs_logit_diff`, `float32_argmax_agreement`), and the float32 merge
# itself is exact to ~1e-4. Tolerance: the bf16 export stays within 2x that floor's logit
# difference and loses at most 2 points of next-token agreement below the floor's. The 2x is
# the triangle inequality: |export - reference| <= |export - float32| + |float32 - reference|,
# two bf16 roundings of the same model, each about the floor. Measured on the tiny model, whose
# near-uniform logits make ties common: 0.484 vs a floor of 0.332 (1.46x), and 0.516 vs 0.343
# (1.51x) for an adapter trained with other dropout masks; agreement 0.946 vs 0.944 for the
# floor. A wrong merge is caught by `merge_max_abs_diff` itself.
NOISE_FLOOR_FACTOR = 2.0
AGREEMENT_BELOW_FLOOR = 0.02


def test_tolerance(reproduced_project):
    p, _ = reproduced_project
    check = json.loads((p / "metrics/export.json").read_text())
    assert check["dtype"] == "bfloat16" and check["check_examples"] > 0
    assert check["merge_max_abs_diff"] < 1e-4, "merging in float32 is exact"
    assert check["max_abs_logit_diff"] <= NOISE_FLOOR_FACTOR * check["float32_max_abs_logit_diff"]
    assert check["argmax_agreement"] >= check["float32_argmax_agreement"] - AGREEMENT_BELOW_FLOOR
    assert check["float32_argmax_agreement"] > 0.9, "the floor itself: the same model, another dtype"
    # the export's accuracy differs from the adapter's only by answers that differ from the adapter's
    assert abs(check["test_accuracy"] - check["adapter_test_accuracy"]) <= 1 - check["answer_agreement"] + 1e-9
    # the adapter's answers and losses, computed by the export stage itself, are the ones evaluate scored
    scored = json.loads((p / "metrics/evaluate.json").read_text())
    assert (check["adapter_test_loss"], check["adapter_test_accuracy"]) == (scored["test_loss"], scored["test_accuracy"])


def logits_on_test(model, project, count=8):
    from qlora.splits import load_split

    test = load_split(project / "data/tokenized", "test")["input_ids"][:count]
    with torch.no_grad():
        return [model.eval()(input_ids=torch.tensor([ids])).logits[0].float() for ids in test]


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_exported_model_stands_alone_and_matches_the_adapter(reproduced_project):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.models import load_model

    p, _ = reproduced_project
    out = p / "models/export"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no peft, no bitsandbytes
    assert exported.dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(out).chat_template, "the tokenizer travels with its chat template"

    trained = PeftModel.from_pretrained(load_model(p / "models/quantized", "auto"), p / "models/adapter")
    reference = logits_on_test(trained, p)
    check = json.loads((p / "metrics/export.json").read_text())
    exported = exported.to(getattr(torch, check["checked_in"]))  # what the stage's check computed in
    merged = max_diff(logits_on_test(exported, p), reference)
    assert merged <= check["max_abs_logit_diff"] + 1e-3

    # What the export avoids: merging into the original full-precision base, which the
    # adapter was not trained against, lands further from the model that was evaluated.
    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(p / "models/base"), p / "models/adapter")
    assert max_diff(logits_on_test(naive.merge_and_unload(), p), reference) > 2 * merged


def test_model_card_records_base_data_params_and_metrics(reproduced_project):
    p, _ = reproduced_project
    card = (p / "models/export/README.md").read_text()
    lock = yaml.safe_load((p / "dvc.lock").read_text())["stages"]["prepare"]
    prepared = next(o["md5"] for o in lock["outs"] if o["path"] == "data/prepared")
    assert f"`data/prepared`: {prepared}" in card, "the data version is DVC's hash of the splits"
    params = yaml.safe_load((p / "params.yaml").read_text())
    assert f"r: {params['lora']['r']}" in card and f"learning_rate: {params['train']['learning_rate']}" in card
    accuracy = json.loads((p / "metrics/evaluate.json").read_text())["test_accuracy"]
    assert f"test_accuracy: {accuracy}" in card
    assert "local folder" in card, "the base model's source"


def test_float32_export_is_the_unmerged_float32_model_and_auto_falls_back_to_it(tiny_project):
    """export.dtype float32; then auto (bfloat16 where its check passes, as in the reproduced project, else
    float32) with the loss tolerance set between the two exports' measured distances from the adapter, so
    that bf16 is refused and the float32 merge is written."""
    from safetensors import safe_open

    p = tiny_project
    bf16 = json.loads((p / "metrics/export.json").read_text())
    assert bf16["dtype"] == "bfloat16" and bf16["dtype_setting"] == "auto"
    set_params(p / "params.yaml", {"export.dtype": "float32"})
    assert repro(p) == {"validate", "export"}
    check = json.loads((p / "metrics/export.json").read_text())
    assert check["dtype"] == "float32"
    # The merged model is the unmerged one up to the merge's own error (triangle inequality), and each
    # figure is rounded to 4 decimals.
    assert check["max_abs_logit_diff"] == pytest.approx(check["float32_max_abs_logit_diff"],
                                                        abs=check["merge_max_abs_diff"] + 1e-4)

    gaps = [abs(x["test_loss"] - x["adapter_test_loss"]) for x in (check, bf16)]
    # Measured (float32, bf16): (0.0003, 0.0027) computing in bf16, (0.0016, 0.0022) in float32 (AVX2 cap).
    assert gaps[0] < gaps[1], f"the float32 export is further from the adapter than the bf16 one: {gaps}"
    set_params(p / "params.yaml", {"export.dtype": "auto", "export.loss_tolerance": sum(gaps) / 2})
    assert repro(p) == {"validate", "export"}
    auto = json.loads((p / "metrics/export.json").read_text())
    assert auto["dtype"] == "float32" and auto["exported"] is True and auto["test_loss"] == check["test_loss"]
    assert "export.loss_tolerance" in auto["bfloat16_refused"] and auto["bfloat16_test_loss"] == bf16["test_loss"]
    assert json.loads((p / "metrics/exported.json").read_text()) == {"export": "written", "dtype": "float32"}
    with safe_open(p / "models/export/model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float32"}
    assert "saved in float32 (export.dtype auto)" in (p / "models/export/README.md").read_text()


def test_an_export_that_does_not_score_what_the_adapter_scored_is_refused(tiny_project):
    p = tiny_project
    set_params(p / "params.yaml", {"export.loss_tolerance": 1e-9, "export.metric_tolerance": 0.0})
    result = run(["dvc", "repro", "export"], p, check=False)
    assert result.returncode == 0, "a refused model costs the run nothing but its export"
    message = result.stderr
    assert "export refused: the merged model does not score what the adapter scored on test: loss" in message, \
        message[-2000:]
    assert "export.loss_tolerance 1e-09" in json.loads((p / "metrics/export.json").read_text())["refused"]
    assert [f.name for f in (p / "models/export").iterdir()] == ["README.md"], "no model written"
    assert json.loads((p / "metrics/exported.json").read_text()) == {"export": "refused"}


def test_export_on_demand_loads_no_model_and_always_exports_it_later(tiny_project):
    """A sweep's run with export.when: on_demand: the export folder holds only the note saying how to export,
    export.json says it was not exported; then export.when: always exports that same run, and only export
    (with validate's check of params.yaml) reruns."""
    p = tiny_project
    exported = json.loads((p / "metrics/export.json").read_text())
    set_params(p / "params.yaml", {"export.when": "on_demand"})
    assert repro(p) == {"validate", "export"}
    assert [f.name for f in (p / "models/export").iterdir()] == ["README.md"]
    assert "export.when=always" in (p / "models/export/README.md").read_text()
    assert json.loads((p / "metrics/export.json").read_text()) == {"exported": False, "when": "on_demand"}
    assert json.loads((p / "metrics/exported.json").read_text()) == {"export": "on_demand"}
    set_params(p / "params.yaml", {"export.when": "always"})
    assert repro(p) == {"validate", "export"}
    again = json.loads((p / "metrics/export.json").read_text())
    assert again["exported"] is True and again["test_loss"] == exported["test_loss"]
    assert (p / "models/export/model.safetensors").exists()
    assert json.loads((p / "metrics/exported.json").read_text()) == {"export": "written", "dtype": "bfloat16"}


@pytest.mark.parametrize("source", ["bundled", "gguf", "local", "hub"])
def test_the_model_card_names_the_base_of_every_source(source):
    from types import SimpleNamespace

    from qlora.params import SOURCES
    from stages.export import model_card

    assert source in SOURCES
    base = SimpleNamespace(source=source, path={"gguf": "/m/tiny.gguf", "local": "/m/tiny"}.get(source),
                           hub_id="org/model" if source == "hub" else None, revision="abc123")
    p = SimpleNamespace(base=base, quantize=SimpleNamespace(bits=4), export=SimpleNamespace(dtype="bfloat16"))
    card = model_card(p, "bfloat16", SimpleNamespace(model_type="llama", num_hidden_layers=2), {}, {}, {}, {})
    assert {"bundled": "SmolLM2-135M-Instruct", "gguf": "GGUF file tiny.gguf", "local": "local folder /m/tiny",
            "hub": "org/model at revision abc123"}[source] in card


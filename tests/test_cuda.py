"""What runs on a GPU only: paged optimizers, compiled decoder layers, Liger's kernels and packed
rows through FlashAttention or sdpa, each through the train stage on the tiny project. Marked
`cuda`: skipped on a machine without one, run by `benchmarks/gpu.sh` on a lent GPU."""

import json

import pytest

from conftest import run, set_params

pytestmark = pytest.mark.cuda


def train(project, change):
    set_params(project / "params.yaml", change)
    run(["python", "-m", "stages.train"], project)
    return json.loads((project / "metrics/train.json").read_text())


def test_the_gpu_defaults_resolve_and_train(tiny_project):
    train_json = train(tiny_project, {})
    assert train_json["checkpointing"] is True and train_json["checkpointing_every"] == 1
    assert train_json["compiled"] is True and train_json["attention"] in ("sdpa", "flash_attention_2")
    assert train_json["peak_memory_mb"] > 0 and train_json["final_loss"] > 0


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_optimizers_train(tiny_project, optimizer):
    assert train(tiny_project, {"train.optimizer": optimizer, "train.compile": False})["steps"] == 3


def test_compiled_layers_train_as_the_eager_ones(tiny_project):
    eager = train(tiny_project, {"train.compile": False, "lora.dropout": 0.0})
    compiled = train(tiny_project, {"train.compile": True, "lora.dropout": 0.0})
    assert compiled["compiled"] and not eager["compiled"]
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], rel=0.02)


def test_packed_rows_train_on_the_gpu(tiny_project):
    budget = 4 * json.loads((tiny_project / "metrics/tokenize.json").read_text())["max_tokens"]
    train_json = train(tiny_project, {"train.micro_batch_tokens": budget, "train.compile": False})
    assert train_json["micro_batch_tokens"] == budget and train_json["steps"] == 3


def test_liger_kernels_train_where_installed(tiny_project):
    pytest.importorskip("liger_kernel")
    assert train(tiny_project, {"train.liger_kernel": True, "train.compile": False})["liger_kernel"] is True


def test_activation_offloading_trains_with_less_gpu_memory(tiny_project):
    kept = train(tiny_project, {"train.compile": False, "train.gradient_checkpointing": False})
    offloaded = train(tiny_project, {"train.compile": False, "train.gradient_checkpointing": False,
                                     "train.activation_offloading": True})
    assert offloaded["steps"] == 3 and offloaded["peak_memory_mb"] < kept["peak_memory_mb"]

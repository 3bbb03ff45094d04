"""Several training processes through `accelerate launch`, on CPU over gloo, with the tiny model.

`train.processes: 2` makes the train stage relaunch itself as two DDP processes. The
adapter, the curves and train.json must be written once, by the main process, and the
run must match a single process given the same global batch (2 processes x 2 examples
against 1 x 4): same examples at each step, gradients averaged across the processes.
"""

import json

import pytest
import torch

from conftest import run, set_params

COMMON = {"lora.dropout": 0.0, "train.max_steps": 6, "train.logging_steps": 1, "train.eval_steps": 3,
          "train.checkpoint_steps": 0, "train.learning_rate": 1e-2}


def train_outputs(project):
    from safetensors.torch import load_file

    rows = [line.split("\t") for line in
            (project / "metrics/live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    losses, steps = [float(loss) for _, loss in rows], [int(step) for step, _ in rows]
    val = [float(line.split("\t")[1]) for line in
           (project / "metrics/live/plots/metrics/eval/loss.tsv").read_text().splitlines()[1:]]
    return (losses, steps, val, json.loads((project / "metrics/train.json").read_text()),
            load_file(project / "models/adapter/adapter_model.safetensors"))


def test_two_processes_write_once_and_match_one_process(tiny_project):
    p = tiny_project
    set_params(p / "params.yaml", {**COMMON, "train.batch_size": 4})
    run(["dvc", "repro", "train"], p)
    one_losses, _, one_val, one_metrics, one_adapter = train_outputs(p)

    set_params(p / "params.yaml", {**COMMON, "train.batch_size": 2, "train.processes": 2})
    result = run(["dvc", "repro", "train"], p)
    log = result.stdout + result.stderr
    assert "2 processes (ddp)" in log and "accelerate/ddp.yaml" in log
    assert "world of 2 processes (MULTI_CPU)" in log, log[-3000:]
    losses, steps, val, metrics, adapter = train_outputs(p)

    # Written once: one curve row per step, one summary line, nothing half-written left over.
    assert steps == list(range(1, 7))
    assert log.count("6 steps in") == 1
    assert metrics["steps"] == 6
    assert not list(p.glob("models/.tmp-*")) and not list(p.glob("metrics/.tmp-*"))
    assert not (p / ".checkpoints").exists() or not any((p / ".checkpoints").iterdir())
    assert run(["dvc", "status", "train"], p).stdout.strip().endswith("up to date.")

    assert len(val) == 3 and val[-1] < val[0] * 0.9, val  # it learns: val loss before step 1, at 3 and 6
    # The same global batch of the same examples: the same run, up to float rounding.
    assert losses == pytest.approx(one_losses, rel=0.02), (losses, one_losses)
    assert val == pytest.approx(one_val, rel=0.02), (val, one_val)
    assert adapter.keys() == one_adapter.keys()
    # The adapters are bf16 (TRL's QLoRA default) and Adam divides by the gradient's own size, so
    # float-order differences in the averaged gradient move single weights by a bf16 step or two.
    drift = {name: float((w.float() - one_adapter[name].float()).norm() / one_adapter[name].float().norm())
             for name, w in adapter.items()}
    assert max(drift.values()) < 0.05, drift


@pytest.mark.cpu  # the refusal of FSDP without CUDA
def test_bad_distributed_settings_stop_before_any_training(tiny_project):
    p = tiny_project
    for setting, message in (("nope", "nope.yaml does not exist (there: ddp, fsdp)"),
                             ("fsdp", "train.distributed fsdp is FSDP, which needs CUDA GPUs")):
        set_params(p / "params.yaml", {"train.processes": 2, "train.distributed": setting})
        result = run(["dvc", "repro", "train"], p, check=False)
        assert result.returncode != 0
        assert message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr

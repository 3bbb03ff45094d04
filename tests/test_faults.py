"""Crashes, non-finite losses and hostile params: nothing lost, nothing reported as done.

Real `dvc repro` in temporary git repos on the tiny model.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import locked_stages, make_project, repro, run, set_params, tiny_config
from qlora.checkpoints import newest_complete, step_of

RESUMABLE = {"train.max_steps": 12, "train.checkpoint_steps": 4, "train.eval_steps": 4}
# A resumed run is not bit-identical to an uninterrupted one on this CPU: from the first
# step after the resume, losses differ in the 4th significant digit (measured: final loss
# 12.0119 vs 12.0107, val loss 11.984 vs 11.988; also with lora.dropout 0, so not the
# dropout RNG). Data order, step count, schedule and curves line up; stated tolerance 0.1%.
RESUME_TOLERANCE = 1e-3
TIMING = {"seconds", "tokens_per_second", "resumed_from_step", "mfu", "peak_memory_mb", "threads"}  # cost, not result


def metrics(project, name):
    return json.loads((project / f"metrics/{name}.json").read_text())


def curve(project, name):
    """[(step, value)] of one dvclive curve."""
    path = project / f"metrics/live/plots/metrics/{name}.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return [(int(step), float(value)) for step, value in rows]


def test_killed_training_resumes_and_ends_as_an_uninterrupted_run(tiny_project, tmp_path):
    reference = tmp_path / "uninterrupted"
    shutil.copytree(tiny_project, reference, symlinks=True)
    set_params(reference / "params.yaml", RESUMABLE)
    repro(reference)
    assert not list((reference / ".checkpoints").glob("*/checkpoint-*")), "checkpoints go once the adapter is saved"

    p = tiny_project
    set_params(p / "params.yaml", RESUMABLE)
    lock = locked_stages(p)
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    first = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=p, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while first.poll() is None and time.time() < deadline:
        done = [c for run_dir in (p / ".checkpoints").glob("*") if (c := newest_complete(run_dir))]
        if done and step_of(done[0]) >= 8:
            break
        time.sleep(0.05)
    assert first.poll() is None, "training ended before it could be killed:\n" + first.stdout.read()[-2000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert locked_stages(p) == lock, "the killed run recorded nothing in dvc.lock"
    assert "train" in run(["dvc", "status"], p).stdout

    out = run(["dvc", "repro"], p)
    resumed = re.search(r"resuming from \S+checkpoint-(\d+)", out.stdout + out.stderr)
    assert resumed and int(resumed.group(1)) >= 8, "resumed, not started over"
    assert metrics(p, "train")["resumed_from_step"] == int(resumed.group(1))

    got, want = metrics(p, "train"), metrics(reference, "train")
    words = {k for k, v in want.items() if isinstance(v, str)}  # the attention used: the same, exactly
    assert {k: got[k] for k in words} == {k: want[k] for k in words}
    assert {k: v for k, v in got.items() if k not in TIMING | words} == \
        pytest.approx({k: v for k, v in want.items() if k not in TIMING | words}, rel=RESUME_TOLERANCE)
    got, want = metrics(p, "evaluate"), metrics(reference, "evaluate")
    for key in want:
        if key.endswith("perplexity"):  # exp(loss): the loss's relative difference, times the loss
            continue
        if isinstance(want[key], str):  # the compute dtype and why: the same, exactly
            assert got[key] == want[key], key
        elif key.startswith("gap"):  # a difference of two close losses
            assert got[key] == pytest.approx(want[key], abs=0.01), key
        else:
            assert got[key] == pytest.approx(want[key], rel=RESUME_TOLERANCE), key
    for name in ("train/loss", "eval/loss", "train/learning_rate"):
        steps = [s for s, _ in curve(p, name)]
        assert steps == sorted(set(steps)), f"{name}: no step logged twice"
        assert steps == [s for s, _ in curve(reference, name)], f"{name} continues where it stopped"
        assert [v for _, v in curve(p, name)] == pytest.approx([v for _, v in curve(reference, name)],
                                                               rel=RESUME_TOLERANCE), name
    assert not list((p / ".checkpoints").glob("*/checkpoint-*"))


def test_a_run_with_other_params_or_data_never_resumes_anothers_checkpoint(tiny_project, monkeypatch):
    from qlora.checkpoints import fingerprint
    from qlora.params import parse_params

    p = tiny_project
    monkeypatch.chdir(p)  # the params' paths are relative to the project

    def current():
        return fingerprint(parse_params(p / "params.yaml"))

    seen = {current()}
    for change in ({"lora.r": 4}, {"train.learning_rate": 5e-4}, {"train.seed": 1}):
        set_params(p / "params.yaml", change)
        assert current() not in seen, change
        seen.add(current())
    before = current()
    set_params(p / "params.yaml", {"train.logging_steps": 3, "train.checkpoint_steps": 2})
    assert current() == before, "how often it logs or saves does not matter"
    data = p / "data/tokenized/train.parquet"
    data.unlink()  # a new file: the old one is a link into the DVC cache
    data.write_bytes(b"other data")
    assert current() != before, "other data never resumes it"


def test_same_params_and_seed_twice_give_identical_metrics(tiny_project):
    p = tiny_project
    before = {name: metrics(p, name) for name in ("train", "evaluate")}
    run(["dvc", "repro", "--force", "--single-item", "train"], p)
    run(["dvc", "repro"], p)
    assert {k: v for k, v in metrics(p, "train").items() if k not in TIMING} == \
        {k: v for k, v in before["train"].items() if k not in TIMING}
    assert metrics(p, "evaluate") == before["evaluate"]


@pytest.fixture
def nan_model_dir(tmp_path, tokenizer_dir):
    """A tiny model whose final norm holds a NaN: every logit, and so the loss, is NaN."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = LlamaForCausalLM(tiny_config(len(tokenizer)))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    tokenizer.save_pretrained(tmp_path / "nan-model")
    return tmp_path / "nan-model"


def test_a_nan_loss_stops_training_and_writes_nothing(tmp_path, nan_model_dir):
    from conftest import TINY_OVERRIDES

    p = make_project(tmp_path / "project", {**TINY_OVERRIDES, "base.source": "local", "base.path": str(nan_model_dir)})
    result = run(["dvc", "repro", "train"], p, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert re.search(r"train: (eval_)?loss = nan at step \d+; training stopped", output), output[-3000:]
    assert "train.learning_rate" in output, "the message names the levers"
    assert not (p / "models/adapter").exists() and not (p / "metrics/train.json").exists()
    assert "train" not in yaml.safe_load((p / "dvc.lock").read_text())["stages"], "not recorded as done"


@pytest.mark.parametrize("key,value,expected", [
    ("paths.raw", "data/x; touch PWNED #", "data/x; touch PWNED #"),
    ("train.lr_scheduler", "x; touch PWNED #", "train.lr_scheduler must be one of"),
])
def test_params_never_reach_a_shell(tiny_project, key, value, expected):
    p = tiny_project
    stages = yaml.safe_load((p / "dvc.yaml").read_text())["stages"]
    assert not any("${" in s["cmd"] for s in stages.values()), "no param is interpolated into a command"
    result = run(["dvc", "exp", "run", "-S", f"{key}='{value}'"], p, check=False)  # quoted: one string
    assert not list(p.rglob("PWNED")) and not os.path.exists("PWNED"), "nothing ran"
    assert result.returncode != 0 and expected in result.stdout + result.stderr


def snapshot(project):
    """What a user sees of their results: git's and DVC's status, and every tracked output's bytes."""
    files = sorted(f for d in ("metrics", "models", "data") for f in (project / d).rglob("*") if f.is_file())
    return (run(["git", "status", "--porcelain"], project).stdout, run(["dvc", "status", "--json"], project).stdout,
            {f.relative_to(project).as_posix(): f.read_bytes() for f in files})


@pytest.mark.parametrize("change,message", [
    ({"paths.raw": "data/raw/missing.csv"}, "data/raw/missing.csv"),  # DVC: "No such file or directory"
    ({"lora.rank": 16}, "params.yaml: unknown key lora.rank"),
    ({"data.labels": ["nope"]}, "params.yaml data.labels keeps rows whose answer"),
    ({"train.distributed": "nope", "train.processes": 2}, "accelerate/nope.yaml does not exist"),
])
def test_a_bad_value_leaves_the_last_good_results_as_they_were(tiny_project, change, message):
    p = tiny_project
    set_params(p / "params.yaml", change)
    before = snapshot(p)
    result = run(["dvc", "repro"], p, check=False)
    assert result.returncode != 0 and message in result.stdout + result.stderr, result.stderr[-2000:]
    assert snapshot(p) == before, "git status, dvc status and every output as they were"


def test_a_failed_exp_run_keeps_the_outputs_and_apply_restores_params(tiny_project):
    p = tiny_project
    outputs = snapshot(p)[2]
    result = run(["dvc", "exp", "run", "-S", "paths.raw=data/raw/missing.csv"], p, check=False)
    assert result.returncode != 0
    assert snapshot(p)[2] == outputs, "the prepared data, metrics and adapter are all still there"
    run(["git", "checkout", "params.yaml"], p)  # the documented way back
    assert run(["dvc", "status", "--json"], p).stdout.strip() == "{}"


def test_a_run_shorter_than_logging_steps_still_logs_and_saves(tiny_project):
    p = tiny_project
    set_params(p / "params.yaml", {"train.max_steps": 4, "train.logging_steps": 5, "train.eval_steps": 3})
    run(["dvc", "repro", "train"], p)
    assert [s for s, _ in curve(p, "train/loss")] == [4], "the last step is logged"
    assert [s for s, _ in curve(p, "eval/loss")] == [0, 3, 4], "and evaluated: the val curve ends where training did"
    assert metrics(p, "train")["steps"] == 4 and (p / "models/adapter/adapter_model.safetensors").exists()

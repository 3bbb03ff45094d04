"""Our train stage against `trl sft`, like for like, on the same model, data and hyperparameters.

    python benchmarks/bench_train.py [--steps 20] [--reps 2] [-S key=value ...]
    python benchmarks/bench_train.py --base DIR -S paths.quantized=DIR --pack 2048   # another model, packed

Needs a reproduced project (`make repro`): it reads models/base, models/quantized,
models/tokenizer, data/prepared and data/tokenized, and writes only under a temporary
folder. Runs alternate (ours, trl, ours, trl, ...) so that drift on a noisy machine hits both.

Like for like: `trl sft` gets the prepared train split as conversational prompt-completion
rows with the same system turn our tokenize stage adds (`tokenize.system_prompt`), so both
render the same chat template over the same tokens; the same 4-bit quantization, LoRA,
batch, learning rate and schedule, seed (so the same shuffled order of the same examples),
maximum length; completion-only loss in both. Each tool checkpoints activations as it does by
default: trl sft every layer; ours `train.gradient_checkpointing: auto`, off on CPU. Where the
two differ, a third run, ours with checkpointing every layer as trl sft, gives the
ratios at the same recompute too (`same_checkpointing` in the results).

Figures per run:
- non-padding tokens per second, every tool timed by the same clock: its whole training loop,
  from before its first step to after its last (the data loading between steps, the logging and
  the optimizer included), over the tokens it counted in its own batches (SFTTrainer's
  `num_tokens`, the ones of each batch's attention mask, in all of them). trl sft and Unsloth:
  the Trainer's `train_runtime`. Ours: the train stage's wall time of `trainer.train()`
  (train.json `seconds`) less its val-loss passes (the first and the last step's, their
  `eval_runtime`), which trl sft, with no eval set here, does not make; that wall time also holds
  the loop's setup (data loader, optimizer), which `train_runtime` leaves out;
- peak memory: the process's maximum RSS on CPU (its own wait4 rusage); on a GPU the most memory
  torch allocated there, printed at exit by the same hook in both tools (benchmarks/peak_hook);
- final train loss (the last step's), so that speed is never bought with a broken loss, and the mean
  over the last tenth of the steps (`tail_loss`): the last step is one batch, and the two tools'
  dropout masks come from different random streams;
- MFU: F = 4N + 12·L·d·T + 6·P_lora FLOPs per token times tokens/s over the bf16 matmul peak
  of this machine (qlora/cost.py).
Writes `benchmarks/results/train-vs-trl.json` (every run, medians, ratios, machine, versions,
commit, date); benchmarks/README.md renders it (make docs).
"""

import argparse
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scratch import write_params  # noqa: E402
from benchmarks.stamp import TRAIN_STAGE, UPSTREAM, stamp  # noqa: E402

# What the figures depend on: this script, its helpers, the train stage, the outputs it reads (python -m tools.docs)
CODE = ["benchmarks/bench_train.py", "benchmarks/scratch.py",
        "benchmarks/peak_hook/sitecustomize.py", "benchmarks/unsloth_sft.py", *TRAIN_STAGE, *UPSTREAM]


def run_measured(cmd, cwd, env, log):
    """(output, wall seconds, peak RSS in MB) of one child process, its output kept in `log`."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    text = Path(log).read_text()
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{text[-3000:]}")
    return text, wall, usage.ru_maxrss / 1024


HOOK = Path(__file__).resolve().parent / "peak_hook"  # prints the peak GPU memory at exit


def child_env(**extra):
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(HOOK), str(ROOT), os.environ.get("PYTHONPATH", "")]),
                **extra)


def peak_cuda_mb(text):
    found = re.findall(r"qlora-peak-cuda-mb: ([\d.]+)", text)
    return max(map(float, found)) if found else None


def last_value(text, key):
    found = re.findall(rf"'{key}': '?([-\d.e+]+)'?", text)
    return float(found[-1]) if found else None


def tail(losses):
    """The mean loss of the last tenth of the steps (at least one): the last step alone is one batch, and
    the two tools' dropout masks come from different random streams."""
    n = max(1, len(losses) // 10)
    return sum(losses[-n:]) / n


def column(tsv):
    """The values of one dvclive curve (step, value per line)."""
    return [float(line.split("\t")[1]) for line in tsv.read_text().splitlines()[1:]] if tsv.exists() else []


def ours(scratch, steps, overrides, env=None):
    """The train stage on a scratch copy of params, reading the project's outputs in place, timed by its
    whole training loop: the wall time of `trainer.train()` less its val-loss passes; `env` adds to the
    environment (a kernel cap)."""
    work = scratch / "ours"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_params(work, [f"train.max_steps={steps}", "train.logging_steps=1", f"train.eval_steps={10 * steps}",
                        *overrides])
    out, wall, rss = run_measured([sys.executable, "-m", "stages.train"], work, child_env(**(env or {})),
                                  scratch / "ours.log")
    train = json.loads((work / "metrics/train.json").read_text())
    live = work / "metrics/live/plots/metrics"
    tokens = column(live / "train/num_tokens.tsv")[-1]  # SFTTrainer's count of its batches, as trl sft's
    runtime = train["seconds"] - sum(column(live / "eval/runtime.tsv"))  # the loop without its val-loss passes
    losses = column(live / "train/loss.tsv")
    return dict(tokens=tokens, tokens_per_second=tokens / runtime, step_seconds=runtime / train["steps"],
                loop_seconds=runtime,
                final_loss=train["final_loss"], tail_loss=tail(losses), wall=wall, rss_mb=rss, steps=train["steps"],
                gpu_peak_mb=peak_cuda_mb(out), trainable_parameters=train["trainable_parameters"])


def trl_data(scratch, system_prompt):
    """data/prepared as trl's conversational prompt-completion format, in a folder `load_dataset` reads,
    with the system turn our tokenize stage adds."""
    folder = scratch / "trl-data"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (ROOT / "data/prepared/train.jsonl").read_text().splitlines()]
    with open(folder / "train.jsonl", "w") as f:
        for r in rows:
            prompt = r["messages"]
            if system_prompt and prompt[0]["role"] != "system":
                prompt = [{"role": "system", "content": system_prompt}, *prompt]
            f.write(json.dumps({"prompt": prompt,
                                "completion": [{"role": "assistant", "content": r["completion"]}]}) + "\n")
    return folder


@functools.cache
def mean_tokens():
    import pandas as pd

    return pd.read_parquet(ROOT / "data/tokenized/train.parquet")["input_ids"].map(len).mean()


def trl(scratch, steps, params, data, base, pack, rows=1):
    work = scratch / "trl"
    shutil.rmtree(work, ignore_errors=True)
    lo, t, q = params["lora"], params["train"], params["quantize"]
    from qlora.models import device

    cuda = device() == "cuda"
    model = scratch / "trl-model"  # the base weights with the tokenizer beside them, as a hub folder has
    if not model.exists():
        model.mkdir()
        for folder in (base, ROOT / params["paths"]["tokenizer"]):
            for f in Path(folder).iterdir():
                if not (model / f.name).exists():
                    (model / f.name).symlink_to(f)
    batch = ["--per_device_train_batch_size", str(rows), "--packing", "True"] if pack else \
        ["--per_device_train_batch_size", str(t["batch_size"])]
    cmd = [shutil.which("trl") or str(Path(sys.executable).parent / "trl"), "sft",
           "--model_name_or_path", str(model), "--dataset_name", str(data),
           "--output_dir", str(work), "--max_steps", str(steps), "--logging_steps", "1",
           *batch, "--gradient_accumulation_steps", str(t["gradient_accumulation_steps"]),
           "--learning_rate", str(t["learning_rate"]), "--lr_scheduler_type", t["lr_scheduler"],
           "--warmup_steps", str(t["warmup_ratio"]), "--optim", t["optimizer"], "--seed", str(t["seed"]),
           "--max_length", str(pack or params["tokenize"]["max_length"]),
           "--use_peft", "--lora_r", str(lo["r"]), "--lora_alpha", str(lo["alpha"]),
           "--lora_dropout", str(lo["dropout"]), "--lora_target_modules",
           *([lo["target_modules"]] if isinstance(lo["target_modules"], str) else lo["target_modules"]),
           "--load_in_4bit", "--bnb_4bit_quant_type", q["quant_type"],
           *(["--use_bnb_nested_quant"] if q["double_quant"] else []), "--dtype", q["compute_dtype"],
           "--bf16", str(q["compute_dtype"] == "bfloat16"),
           "--save_strategy", "no", "--report_to", "none",
           # on a GPU both use sdpa attention (ours: attn_implementation auto); on CPU trl keeps its default
           *(["--attn_implementation", "sdpa"] if cuda else ["--use_cpu", "True"])]
    env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    measured = trainer_run(cmd, env, scratch / "trl.log", steps)
    shutil.rmtree(work, ignore_errors=True)
    return measured


def trainer_run(cmd, env, log, steps):
    """The figures of one SFTTrainer run from its printed logs: its whole training loop's runtime,
    its own token count (the attention mask's ones, no padding), every step's loss."""
    out, wall, rss = run_measured(cmd, ROOT, env, log)
    runtime, tokens = last_value(out, "train_runtime"), last_value(out, "num_tokens")
    losses = [float(v) for v in re.findall(r"'loss': '?([-\d.e+]+)'?", out)]
    return dict(tokens=tokens, tokens_per_second=tokens / runtime, step_seconds=runtime / steps,
                loop_seconds=runtime, final_loss=losses[-1], tail_loss=tail(losses), wall=wall, rss_mb=rss, steps=steps,
                gpu_peak_mb=peak_cuda_mb(out))


def unsloth(scratch, steps, params, data, base, pack, rows):
    """Unsloth at its documented settings (its own 4-bit loading, its gradient checkpointing, its
    kernels) on the same data, LoRA, rows and schedule, timed by the same clock: its whole training loop."""
    cmd = [sys.executable, str(ROOT / "benchmarks/unsloth_sft.py"), "--model", str(base), "--data", str(data),
           "--steps", str(steps), "--pack", str(pack), "--rows", str(rows), "--params", json.dumps(params)]
    return trainer_run(cmd, child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), scratch / "unsloth.log", steps)


EVERY_LAYER = "ours, checkpointing every layer"  # the same recompute as trl sft


def checkpoints_fewer_layers(overrides):
    """Whether our run, as configured, checkpoints fewer layers than trl sft (every layer): then the benchmark
    measures ours at every layer too."""
    from qlora.params import parse_params
    from stages.train import checkpointing, checkpointing_every

    with tempfile.TemporaryDirectory() as tmp:  # params.yaml with the overrides, read as the stage reads it
        t = parse_params(write_params(Path(tmp), overrides)).train
    return not checkpointing(t) or checkpointing_every(t) != 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--reps", type=int, default=2, help="runs of each, alternating")
    parser.add_argument("-S", dest="overrides", action="append", default=[],
                        help="key=value for our run only, as dvc exp run -S (to measure one lever)")
    parser.add_argument("--name", default="train-vs-trl", help="the results file: benchmarks/results/NAME.json")
    parser.add_argument("--base", help="another base model folder (bf16 weights and config) for trl sft and the "
                        "FLOP count; give ours its quantize-stage output with -S paths.quantized=DIR")
    parser.add_argument("--pack", type=int, default=0, metavar="TOKENS",
                        help="packed rows of this many tokens: trl sft --packing --max_length TOKENS with --rows rows "
                             "per micro-batch; ours train.micro_batch_tokens TOKENS x ROWS, the same tokens per "
                             "micro-step, with a global batch of as many examples as fill it on average")
    parser.add_argument("--rows", type=int, default=1, help="with --pack: packed rows per micro-batch of trl sft")
    parser.add_argument("--unsloth", action="store_true",
                        help="also Unsloth (benchmarks/unsloth_sft.py) on the same data, rows and LoRA, where installed")
    args = parser.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for needed in ("data/tokenized", "data/prepared", *(() if args.base else ("models/base", "models/quantized"))):
        if not (ROOT / needed).exists():
            raise SystemExit(f"{needed} is missing: run `make repro` (or `dvc pull`) first")
    base = Path(args.base or ROOT / params["paths"]["base"]).resolve()
    overrides = list(args.overrides)
    if args.pack:
        per_step = max(1, round(args.pack * args.rows / mean_tokens()))
        overrides += [f"train.micro_batch_tokens={args.pack * args.rows}", f"train.batch_size={per_step}",
                      "train.gradient_accumulation_steps=1"]

    from transformers import AutoConfig

    from qlora import cost
    from qlora.outputs import provenance

    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        scratch = Path(tmp)
        data = trl_data(scratch, params["tokenize"]["system_prompt"])
        runs = {"ours": lambda: ours(scratch, args.steps, overrides)}
        if checkpoints_fewer_layers(overrides):
            runs[EVERY_LAYER] = lambda: ours(scratch, args.steps, [*overrides, "train.gradient_checkpointing=true",
                                                                "train.gradient_checkpointing_every=1"])
        runs["trl sft"] = lambda: trl(scratch, args.steps, params, data, base, args.pack, args.rows)
        if args.unsloth:
            runs["unsloth"] = lambda: unsloth(scratch, args.steps, params, data, base, args.pack, args.rows)
        results = {name: [] for name in runs}
        for rep in range(args.reps):
            for name, fn in runs.items():
                r = fn()
                results[name].append({k: v if v is None else round(v, 4) for k, v in r.items()})
                gpu = f"  GPU {r['gpu_peak_mb']:6.0f} MB" if r["gpu_peak_mb"] is not None else ""
                print(f"rep {rep + 1} {name:8s} {r['tokens_per_second']:7.1f} tokens/s  {r['tokens']:7.0f} tokens  "
                      f"{r['rss_mb']:6.0f} MB{gpu}  loss {r['final_loss']:.4f} (tail {r['tail_loss']:.4f})  "
                      f"wall {r['wall']:.0f} s", flush=True)

    import torch

    config = AutoConfig.from_pretrained(base)
    for r in results["ours"] + results.get(EVERY_LAYER, []):  # the same adapter in every run and in both tools
        lora = r.pop("trainable_parameters")
    flops = cost.flops_per_token(config, mean_tokens(), lora)
    peak = cost.peak(torch.get_num_threads())
    tools = {}
    for name, runs in results.items():
        med = {k: None if runs[0][k] is None else round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
        tools[name] = stamp(dict(runs=runs, **med, mfu=round(med["tokens_per_second"] * flops / peak, 4)))
    o, t = tools["ours"], tools["trl sft"]
    result = dict(
        steps=args.steps, reps=args.reps, overrides=overrides, pack=args.pack, rows=args.rows,
        clock="whole training loop", tools=tools,
        unsloth_speed_ratio=round(o["tokens_per_second"] / tools["unsloth"]["tokens_per_second"], 3)
        if "unsloth" in tools else None,
        model=dict(base=base.name, layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                   vocab_size=config.vocab_size, model_type=config.model_type),
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        speed_ratio=round(o["tokens_per_second"] / t["tokens_per_second"], 3),
        wall_ratio=round(t["wall"] / o["wall"], 3),
        memory_ratio=round(o["rss_mb"] / t["rss_mb"], 3),
        gpu_memory_ratio=round(o["gpu_peak_mb"] / t["gpu_peak_mb"], 3) if o["gpu_peak_mb"] and t["gpu_peak_mb"] else None,
        loss_difference_pct=round(100 * abs(o["final_loss"] - t["final_loss"]) / t["final_loss"], 2),
        tail_loss_difference_pct=round(100 * abs(o["tail_loss"] - t["tail_loss"]) / t["tail_loss"], 2),
        tokens_ratio=round(o["tokens"] / t["tokens"], 4),  # the same examples: the two counts should agree
        same_checkpointing=dict(speed_ratio=round(tools[EVERY_LAYER]["tokens_per_second"] / t["tokens_per_second"], 3),
                                memory_ratio=round(tools[EVERY_LAYER]["rss_mb"] / t["rss_mb"], 3))
        if EVERY_LAYER in tools else None,
        flops_per_token=round(flops), peak_flops=round(peak), threads=torch.get_num_threads(),
        **provenance(),
    )
    out = ROOT / "benchmarks/results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.endswith(("ratio", "pct", "checkpointing"))}, indent=2))


if __name__ == "__main__":
    main()

"""Our train stage against `trl sft`, side by side, on the same model, data and hyperparameters.

    python benchmarks/bench_train.py [--steps 20] [--reps 3]

Needs a reproduced project (`make repro`): it reads models/base, models/quantized,
models/tokenizer, data/prepared and data/tokenized, and writes only under a temporary
folder. Runs alternate (ours, trl, ours, trl, ...) so drift on a noisy machine hits both;
it prints the median of each figure and a Markdown table for benchmarks/README.md.

Figures per run:
- non-padding tokens per second of the training steps (ours: its own count; trl sft's
  CLI can only count padding too, so its count is steps x batch x the data's mean
  example length; ours leaves its val-loss pass before the first step out, trl sft has
  no eval set here);
- wall time per optimizer step (the Trainer's train_runtime / steps, eval excluded);
- peak memory: the process's maximum RSS on CPU (from /usr/bin/time-like wait4 rusage);
- final train loss (the last step's), so speed is never bought with a broken loss;
- MFU: F = 4N + 12*L*d*T + 6*P_lora FLOPs per token (N matmul parameters, L layers,
  d hidden size, T mean tokens per example, P_lora adapter parameters) times tokens/s,
  over the peak measured here with a large bf16 matmul (the achievable peak of this
  machine's matmul units, not a datasheet number).
"""

import argparse
import functools
import json
import os
import platform
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


def last_value(text, key):
    found = re.findall(rf"'{key}': '?([-\d.e+]+)'?", text)
    return float(found[-1]) if found else None


def ours(scratch, steps, overrides):
    """The train stage on a scratch copy of params, reading the project's outputs in place."""
    work = scratch / "ours"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_params(work, [f"train.max_steps={steps}", "train.logging_steps=1", f"train.eval_steps={10 * steps}",
                        *overrides])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out, wall, rss = run_measured([sys.executable, "-m", "stages.train"], work, env, scratch / "ours.log")
    train = json.loads((work / "metrics/train.json").read_text())
    live = work / "metrics/live/plots/metrics"
    tokens = float((live / "train/num_input_tokens_seen.tsv").read_text().splitlines()[-1].split("\t")[1])
    runtime = tokens / train["tokens_per_second"]  # the stage's own training seconds, evaluations excluded
    return dict(tokens=tokens, tokens_per_second=tokens / runtime, step_seconds=runtime / train["steps"],
                final_loss=train["final_loss"], wall=wall, rss_mb=rss, steps=train["steps"])


def trl_data(scratch):
    """data/prepared as trl's conversational prompt-completion format, in a folder `load_dataset` reads."""
    folder = scratch / "trl-data"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (ROOT / "data/prepared/train.jsonl").read_text().splitlines()]
    with open(folder / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["messages"],
                                "completion": [{"role": "assistant", "content": r["completion"]}]}) + "\n")
    return folder


@functools.cache
def mean_tokens():
    import pandas as pd

    return pd.read_parquet(ROOT / "data/tokenized/train.parquet")["input_ids"].map(len).mean()


def trl(scratch, steps, params, data):
    work = scratch / "trl"
    shutil.rmtree(work, ignore_errors=True)
    lo, t, q = params["lora"], params["train"], params["quantize"]
    model = scratch / "trl-model"  # models/base with its tokenizer beside it, as a hub folder has
    if not model.exists():
        model.mkdir()
        for folder in (params["paths"]["base"], params["paths"]["tokenizer"]):
            for f in (ROOT / folder).iterdir():
                (model / f.name).symlink_to(f)
    cmd = [shutil.which("trl") or str(Path(sys.executable).parent / "trl"), "sft",
           "--model_name_or_path", str(model), "--dataset_name", str(data),
           "--output_dir", str(work), "--max_steps", str(steps), "--logging_steps", "1",
           "--per_device_train_batch_size", str(t["batch_size"]),
           "--gradient_accumulation_steps", str(t["gradient_accumulation_steps"]),
           "--learning_rate", str(t["learning_rate"]), "--lr_scheduler_type", t["lr_scheduler"],
           "--warmup_steps", str(t["warmup_ratio"]), "--optim", t["optimizer"], "--seed", str(t["seed"]),
           "--max_length", str(params["tokenize"]["max_length"]),
           "--use_peft", "--lora_r", str(lo["r"]), "--lora_alpha", str(lo["alpha"]),
           "--lora_dropout", str(lo["dropout"]), "--lora_target_modules", *lo["target_modules"],
           "--load_in_4bit", "--bnb_4bit_quant_type", q["quant_type"],
           *(["--use_bnb_nested_quant"] if q["double_quant"] else []), "--dtype", q["compute_dtype"],
           "--bf16", str(q["compute_dtype"] == "bfloat16"),
           "--save_strategy", "no", "--report_to", "none",
           "--use_cpu", "True"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out, wall, rss = run_measured(cmd, ROOT, env, scratch / "trl.log")
    runtime = last_value(out, "train_runtime")
    # The CLI can count all tokens only, padding included; the non-padding tokens of `steps`
    # batches drawn from this data are estimated from its mean length (same template, same cut).
    tokens = steps * t["batch_size"] * t["gradient_accumulation_steps"] * mean_tokens()
    losses = re.findall(r"'loss': '?([-\d.e+]+)'?", out)
    shutil.rmtree(work, ignore_errors=True)
    return dict(tokens=tokens, tokens_per_second=tokens / runtime, step_seconds=runtime / steps,
                final_loss=float(losses[-1]), wall=wall, rss_mb=rss, steps=steps)


def matmul_peak(seconds=3.0):
    """Achievable bf16 matmul FLOP/s on this machine (all threads torch uses)."""
    import torch

    n = 2048
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def flops_per_token(params):
    """F = 4N + 12*L*d*T + 6*P_lora, from the base model's config and the tokenized data."""
    import pandas as pd
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ROOT / params["paths"]["base"])
    L, d = config.num_hidden_layers, config.hidden_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size  # q, o, k, v, mlp
    n_matmul = L * per_layer + d * config.vocab_size  # the lm_head matmul runs whether or not it is tied
    T = mean_tokens()
    p_lora = json.loads((ROOT / "metrics/train.json").read_text())["trainable_parameters"]
    return 4 * n_matmul + 12 * L * d * T + 6 * p_lora, dict(N=n_matmul, L=L, d=d, T=round(T, 1), P_lora=p_lora)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--reps", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("-S", dest="overrides", action="append", default=[],
                        help="key=value for our run only, as dvc exp run -S (to measure one lever)")
    args = parser.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for needed in ("models/base", "models/quantized", "data/tokenized", "data/prepared", "metrics/train.json"):
        if not (ROOT / needed).exists():
            raise SystemExit(f"{needed} is missing: run `make repro` (or `dvc pull`) first")

    results = {"ours": [], "trl sft": []}
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        scratch = Path(tmp)
        data = trl_data(scratch)
        for rep in range(args.reps):
            for name, fn in (("ours", lambda: ours(scratch, args.steps, args.overrides)),
                             ("trl sft", lambda: trl(scratch, args.steps, params, data))):
                r = fn()
                results[name].append(r)
                print(f"rep {rep + 1} {name:8s} {r['tokens_per_second']:7.1f} tok/s  {r['step_seconds']:.2f} s/step  "
                      f"{r['rss_mb']:6.0f} MB  loss {r['final_loss']:.4f}  wall {r['wall']:.0f} s", flush=True)

    peak = matmul_peak()
    flops, shape = flops_per_token(params)
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    rows = []
    for name, m in med.items():
        mfu = m["tokens_per_second"] * flops / peak
        rows.append(f"| {name} | {m['tokens_per_second']:.1f} | {m['step_seconds']:.2f} | {m['rss_mb']:.0f} | "
                    f"{m['final_loss']:.4f} | {100 * mfu:.1f}% |")
    o, t = med["ours"], med["trl sft"]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print()
    print(f"Machine: {cpu}, {os.cpu_count()} cores, torch threads {__import__('torch').get_num_threads()}; "
          f"bf16 matmul peak measured {peak / 1e9:.1f} GFLOP/s")
    print(f"Model shapes for MFU: {shape}; F = {flops / 1e6:.1f} MFLOP per token")
    print(f"{args.steps} steps per run, {args.reps} runs each, medians; our overrides: "
          f"{' '.join(args.overrides) or 'none'}")
    print()
    print("| run | non-padding tokens/s | s/step | peak RSS (MB) | final loss | MFU |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"| ratio ours / trl sft | {o['tokens_per_second'] / t['tokens_per_second']:.2f}x | "
          f"{o['step_seconds'] / t['step_seconds']:.2f}x | {o['rss_mb'] / t['rss_mb']:.2f}x | | |")


if __name__ == "__main__":
    main()

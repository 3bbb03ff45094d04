"""What one experiment costs, stage by stage: its training against the checks after it.

    python benchmarks/bench_stages.py [--models default qwen2-0.5b] [--steps N]

For each model, in a fresh clone of HEAD (this project's `.venv` linked in): `dvc repro` from
scratch, then a one-lever experiment (`dvc exp run -S lora.r=16`), which reruns train, evaluate
and export. Each stage's wall time runs from DVC starting it to the next one's start (the last:
to the command's end). Writes `benchmarks/results/stage-times.json`, a row per model, each with
both runs' stage seconds, export and evaluate over train, and its own provenance; the rows of
models not run this time are kept.

- `default`: the project as committed.
- `qwen2-0.5b`: random weights of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads, 2 KV
  heads, MLP 4864, tied embeddings) with the bundled SmolLM2 tokenizer, written as an f16 GGUF file
  by the export stage's converter with the bundled GGUF's tokenizer (`base.source: gguf`, as a user
  brings a downloaded GGUF). A local folder would not do: its tokenizer, as transformers writes it
  from a GGUF, is one llama.cpp's converter does not recognize, so the export's GGUF step stops.
  A random model's export is held to wide tolerances: what is timed is the work, not whether the
  model learns. It trains as the default does (2 epochs); `--steps` caps
  its training (`train.max_steps`) for a quicker look, which makes the checks weigh more.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.repro import run_timed  # noqa: E402
from benchmarks.stamp import PIPELINE, stamp  # noqa: E402

CODE = ["benchmarks/bench_stages.py", "benchmarks/repro.py", *PIPELINE]
OUT = ROOT / "benchmarks/results/stage-times.json"
LEVER = "lora.r=16"
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6)


def qwen2_gguf(tmp):
    """A GGUF file: Qwen2.5-0.5B's shape, random weights, the bundled tokenizer (its GGUF fields)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from stages.base import BUNDLED_GGUF, bundled_dir
    from stages.export import converter

    folder, out = tmp / "qwen2-0.5b", tmp / "qwen2-0.5b.f16.gguf"
    tokenizer = AutoTokenizer.from_pretrained(bundled_dir(), gguf_file=BUNDLED_GGUF)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, **QWEN2_05B))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    subprocess.run([sys.executable, "-m", "qlora.gguf_convert", str(bundled_dir() / BUNDLED_GGUF), str(folder),
                    "--outtype", "f16", "--outfile", str(out)], cwd=ROOT, check=True, capture_output=True,
                   env=dict(subprocess.os.environ, PYTHONPATH=str(converter())))
    return out


def overrides(name, tmp, steps):
    if name == "default":
        return []
    return ["base.source=gguf", f"base.path={qwen2_gguf(Path(tmp))}",
            "export.loss_tolerance=10", "export.metric_tolerance=1", *([f"train.max_steps={steps}"] if steps else [])]


def stage_seconds(starts, total):
    ordered = sorted(starts, key=starts.get)
    ends = [starts[name] for name in ordered[1:]] + [total]
    return {name: round(end - starts[name], 1) for name, end in zip(ordered, ends)}


def measure(name, steps):
    dvc = str(ROOT / ".venv/bin/dvc")
    env = dict(subprocess.os.environ, PATH=f"{ROOT / '.venv/bin'}:{subprocess.os.environ['PATH']}")
    with tempfile.TemporaryDirectory(prefix="stages-") as tmp:
        project = Path(tmp) / "project"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
        (project / ".venv").symlink_to(ROOT / ".venv")
        changed = overrides(name, tmp, steps)
        if changed:  # committed, so that the experiment's one lever is all that differs from its baseline
            params = project / "params.yaml"
            data = yaml.safe_load(params.read_text())
            for o in changed:
                key, value = o.split("=", 1)
                section, field = key.split(".")
                data[section][field] = yaml.safe_load(value)
            params.write_text(yaml.safe_dump(data, sort_keys=False))
            subprocess.run(["git", "commit", "-qam", f"bench_stages: {name}"], cwd=project, check=True)
        _, starts, total = run_timed([dvc, "repro"], project, env)
        first = stage_seconds(starts, total)
        _, starts, total = run_timed([dvc, "exp", "run", "--temp", "-S", LEVER], project, env)
        again = stage_seconds(starts, total)
    return dict(model=name, overrides=changed, first_run=first, experiment=dict(lever=LEVER, stages=again),
                **{f"{stage}_over_train": round(again[stage] / again["train"], 3) for stage in ("evaluate", "export")
                   if stage in again and "train" in again})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["default", "qwen2-0.5b"], choices=["default", "qwen2-0.5b"])
    parser.add_argument("--steps", type=int, help="train.max_steps of the 0.5B model (default: its 2 epochs)")
    args = parser.parse_args()
    rows = {r["model"]: r for r in json.loads(OUT.read_text())["models"]} if OUT.exists() else {}
    for name in args.models:
        rows[name] = stamp(measure(name, args.steps))
        print(json.dumps(rows[name], indent=2), flush=True)
        OUT.write_text(json.dumps(dict(models=list(rows.values())), indent=2) + "\n")


if __name__ == "__main__":
    main()

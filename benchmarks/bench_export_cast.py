"""What the merged export's dtype keeps of the adapter: the default's run and short runs of the README's
one-lever line, exported at `export.dtype: auto`.

    python benchmarks/bench_export_cast.py [--steps 6 20] [--keep DIR]

Clones this repository's committed HEAD into a temporary folder that shares this project's DVC cache,
so the default's outputs (from `make repro` at HEAD) are checked out, not rerun. Then, for the default's
own run and for each N of --steps, `dvc exp run -S lora.r=16 -S train.max_steps=N` (the one-lever line,
cut short), it records:
- from the export stage: the dtype it wrote, bfloat16's test loss where the check refused it, the written
  model's, the adapter's and the base model's, and the share of the fine-tuning's gain in test loss that
  each export keeps;
- in weight space, over every merged layer (W the base weight as dequantized for the merge, D the
  adapter's update): the update's size next to the weight (the median over layers of |D| / |W|,
  Frobenius norms), the share of base weights that a bfloat16 cast leaves as they are (on bf16's grid),
  and what a cast of W + D to bfloat16 and to float16 gets wrong, relative to the update:
  |cast(W + D) - (W + D)| / |D|.
Writes benchmarks/results/export-cast.json; docs/sharing.md renders from it (make docs).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import PIPELINE, stamp  # noqa: E402

# What the figures depend on (python -m tools.docs): the pipeline as dvc exp run runs it
CODE = ["benchmarks/bench_export_cast.py", *PIPELINE]
RESULTS = ROOT / "benchmarks/results/export-cast.json"


def sh(cmd, cwd, env=None):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out


def weight_space(project):
    """The update's size, the base weights' place on bf16's grid, and the casts' error relative to the update."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from stages.export import dequantized

    model = PeftModel.from_pretrained(dequantized(project / "models/quantized", "auto"), project / "models/adapter")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers, "no LoRA layer found"
    ratios, on_grid, count = [], 0, 0
    update = 0.0
    lost = {"bfloat16": 0.0, "float16": 0.0}
    with torch.no_grad():
        for layer in layers:
            w = layer.get_base_layer().weight.float()
            d = layer.get_delta_weight("default").float()
            ratios.append((d.norm() / w.norm()).item())
            on_grid += (w.to(torch.bfloat16).float() == w).sum().item()
            count += w.numel()
            update += d.pow(2).sum().item()
            for name in lost:
                lost[name] += ((w + d).to(getattr(torch, name)).float() - (w + d)).pow(2).sum().item()
    ratios.sort()
    return dict(merged_layers=len(layers), update_over_weight_median=round(ratios[len(ratios) // 2], 6),
                base_weights_on_bf16_grid=round(on_grid / count, 6),
                **{f"{name}_cast_error_over_update": round((v / update) ** 0.5, 4) for name, v in lost.items()})


def record(project, command_line):
    import yaml

    m = lambda name: json.loads((project / f"metrics/{name}.json").read_text())  # noqa: E731
    export, evaluation, train = m("export"), m("evaluate"), m("train")
    params = yaml.safe_load((project / "params.yaml").read_text())
    base, adapter = evaluation["base_test_loss"], export["adapter_test_loss"]
    kept = lambda loss: None if loss is None else round((base - loss) / (base - adapter), 4)  # noqa: E731
    row = dict(steps=train["steps"], lora_r=params["lora"]["r"], loss_tolerance=params["export"]["loss_tolerance"],
               compute_dtype=export.get("compute_dtype"), exported=export["exported"], dtype=export.get("dtype"),
               base_test_loss=base, adapter_test_loss=adapter, export_test_loss=export.get("test_loss"),
               export_gain_kept=kept(export.get("test_loss")) if export["exported"] else None,
               bfloat16_refused=export.get("bfloat16_refused"), bfloat16_test_loss=export.get("bfloat16_test_loss"),
               bfloat16_gain_kept=kept(export.get("bfloat16_test_loss")), **weight_space(project))
    return stamp(row, cwd=ROOT, command_line=command_line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[6, 20])
    parser.add_argument("--keep", type=Path, help="clone here and keep it, instead of a temporary folder")
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="export-cast-"))
    project = folder / "project"
    folder.mkdir(parents=True, exist_ok=True)
    sh(["git", "clone", "-q", str(ROOT), str(project)], folder)
    env = dict(subprocess.os.environ, PATH=f"{Path(sys.executable).parent}:{subprocess.os.environ['PATH']}")
    sh(["dvc", "cache", "dir", "--local", str(ROOT / ".dvc/cache")], project, env)
    sh(["dvc", "checkout", "--quiet"], project, env)
    stale = sh(["dvc", "status"], project, env).stdout
    if "changed" in stale:
        raise SystemExit(f"the default's outputs in the cache are not HEAD's (make repro, commit, rerun):\n{stale}")

    from benchmarks.stamp import command

    rows = {"default": record(project, command())}
    print(json.dumps(rows["default"], indent=1), flush=True)
    for steps in args.steps:
        start = time.perf_counter()
        sh(["dvc", "exp", "run", "-S", "lora.r=16", "-S", f"train.max_steps={steps}"], project, env)
        rows[f"r=16, {steps} steps"] = dict(record(project, command()), seconds=round(time.perf_counter() - start))
        print(json.dumps(rows[f"r=16, {steps} steps"], indent=1), flush=True)
    RESULTS.write_text(json.dumps(dict(rows=rows), indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

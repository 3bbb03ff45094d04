"""A new user's first run on their own model and data: a fresh clone, `params.yaml` edited, `dvc repro`.

    python benchmarks/bring_your_model.py NAME RAW_FILE KEY=VALUE ... [--keep DIR]

Clones this repository's committed HEAD into a temporary folder (as `git clone` gives a user),
copies RAW_FILE into its data/raw/, applies each KEY=VALUE to params.yaml exactly as
`dvc exp run -S` would (`paths.raw` is set to the copied file), runs `dvc repro` to the end and
writes `benchmarks/results/NAME.json`: the edits, the model's family, the format tokenize used,
the base and fine-tuned scores on test with the paired interval of the gain, the losses, the
wall time of each stage, and the machine, versions and commit. Nothing else of the clone is
edited. docs/data.md renders its table from that file (make docs).
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import PIPELINE, command  # noqa: E402
from qlora.outputs import provenance  # noqa: E402
from qlora.scoring import paired_interval  # noqa: E402
from qlora.tasks import TASKS  # noqa: E402

# What the figures depend on (python -m tools.docs): a fresh clone's dvc repro, on the data writing_systems.py or
# debian_sizes.py makes
CODE = ["benchmarks/bring_your_model.py", "benchmarks/writing_systems.py", "benchmarks/debian_sizes.py", *PIPELINE]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name")
    parser.add_argument("raw")
    parser.add_argument("overrides", nargs="*", help="params.yaml edits, as dvc exp run -S takes them")
    parser.add_argument("--keep", type=Path, help="clone here and keep it, instead of a temporary folder")
    args = parser.parse_args()

    from dvc.utils.hydra import apply_overrides

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="byom-"))
    project = folder / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
    raw = project / "data/raw" / Path(args.raw).name
    shutil.copy(args.raw, raw)
    edits = [f"paths.raw={raw.relative_to(project)}", *args.overrides]
    apply_overrides(str(project / "params.yaml"), edits)

    env_path = f"{Path(sys.executable).parent}:{subprocess.os.environ['PATH']}"
    start = time.perf_counter()
    log = project / "repro.log"
    with open(log, "w") as out:
        code = subprocess.run(["dvc", "repro"], cwd=project, stdout=out, stderr=subprocess.STDOUT,
                              env=dict(subprocess.os.environ, PATH=env_path)).returncode
    wall = time.perf_counter() - start
    text = log.read_text()
    if code:
        raise SystemExit(f"dvc repro failed ({code}); log in {log}:\n{text[-3000:]}")

    metrics = {name: json.loads((project / "metrics" / f"{name}.json").read_text())
               for name in ("tokenize", "quantize", "train", "evaluate_base", "evaluate", "export")}
    e, task = metrics["evaluate"], metrics["evaluate_base"]["task"]
    primary, key = TASKS[task].primary, TASKS[task].per_example[TASKS[task].primary]
    rows = json.loads((project / "metrics/predictions.json").read_text())
    low, high = paired_interval([r[f"base_{key}"] for r in rows], [r[key] for r in rows])
    config = json.loads((project / "models/base/config.json").read_text())
    result = dict(
        name=args.name, edits=edits, **dict(provenance(), commit=commit), command=command(),
        model_type=config["model_type"], vocab_size=config["vocab_size"],
        parameters=metrics["quantize"]["parameters"], task=task, primary=primary, test_examples=len(rows),
        template=metrics["tokenize"]["template"], system_prompt=metrics["tokenize"]["system_prompt"],
        stop_tokens=json.loads((project / "data/tokenized/format.json").read_text())["stop_tokens"],
        base=metrics["evaluate_base"], fine_tuned={k: v for k, v in e.items() if k.startswith("test_")},
        gain=round(e[f"test_{primary}"] - e[f"base_test_{primary}"], 4), gain_ci_low=low, gain_ci_high=high,
        losses={k: e[k] for k in ("train_loss", "val_loss", "test_loss", "best_val_loss", "best_val_step")},
        train={k: metrics["train"][k] for k in ("steps", "seconds", "tokens_per_second", "trainable_parameters")},
        export={k: metrics["export"][k] for k in ("test_loss", "adapter_test_loss", "answer_agreement", "gguf_file",
                                                  "gguf_test_loss", "gguf_answer_agreement") if k in metrics["export"]},
        repro_seconds=round(wall), stages=re.findall(r"Running stage '(\w+)'", text),
    )
    out = ROOT / "benchmarks/results" / f"{args.name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()

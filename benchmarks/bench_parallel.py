"""Two queued experiments side by side (`dvc queue start -j 2`) against the same two one after the other.

    python benchmarks/bench_parallel.py [--steps 12] [--unshared]

Clones this repository's committed HEAD into a temporary folder with this project's `.venv`
and DVC cache (so the base model, data and quantized model are checked out, not rebuilt),
then queues two experiments of the default that differ in `train.seed` (reduced to --steps
optimizer steps) and runs them with one worker, then two more (other seeds, so that DVC's
run cache cannot restore them) with two workers. Each experiment reruns train and evaluate,
and export with `export.when: on_demand`, as a sweep's runs do: an adapter of a dozen steps
is barely trained, and the export's checks may rightly refuse its GGUF file (seen with seed 5).
Writes `benchmarks/results/parallel.json`: the wall time of each pair from `dvc queue start`
to both done, their ratio, each experiment's tokens/s and threads, and the machine, versions,
commit and date. `--unshared` also runs a parallel pair with
`QLORA_THREADS` set to every core, as each process took before the cores were shared.
"""

import argparse
import json
import os
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

CODE = ["benchmarks/bench_parallel.py", *PIPELINE]  # what the figures depend on (python -m tools.docs)
EXPORT_WHEN = "on_demand"  # as a sweep's runs: no export (see above)


def sh(args, cwd, env, check=True):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout


def pair(project, env, names_seeds, steps, workers):
    """Queue two experiments, run them with `workers` workers; (wall seconds, each one's train metrics)."""
    for name, seed in names_seeds:
        sh(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.seed={seed}", "-S", f"train.max_steps={steps}",
            "-S", f"train.eval_steps={steps}", "-S", "train.checkpoint_steps=0",
            "-S", f"export.when={EXPORT_WHEN}"], project, env)
    start = time.perf_counter()
    sh(["dvc", "queue", "start", "-j", str(workers)], project, env)
    while True:
        status = sh(["dvc", "queue", "status"], project, env)
        rows = [line for line in status.splitlines() if any(name in line for name, _ in names_seeds)]
        failed = [name for name, _ in names_seeds if any(name in line and "Failed" in line for line in rows)]
        if failed:
            logs = "".join(sh(["dvc", "queue", "logs", name], project, env, check=False)[-3000:] for name in failed)
            raise SystemExit(f"an experiment failed:\n{status}\n{logs}")
        if len(rows) == 2 and all("Success" in line for line in rows):
            break
        time.sleep(2)
    wall = time.perf_counter() - start
    sh(["dvc", "queue", "stop", "--kill"], project, env, check=False)
    train = {}
    for name, _ in names_seeds:
        shown = json.loads(sh(["dvc", "exp", "show", "--json"], project, env, check=False) or "[]")
        train[name] = find_train_metrics(shown, name, project)
    return round(wall, 1), train


def find_train_metrics(shown, name, project):
    """metrics/train.json of experiment `name`, as its commit has it (its rev from `dvc exp show --json`)."""
    def walk(node):
        if isinstance(node, dict):
            if node.get("name") == name:  # an experiment: its newest rev is its commit
                for rev in [node, *node.get("revs", [])]:
                    if (rev.get("data") or {}).get("metrics"):
                        return rev["rev"]
            for value in node.values():
                found = walk(value)
                if found:
                    return found
        if isinstance(node, list):
            for value in node:
                found = walk(value)
                if found:
                    return found
        return None

    rev = walk(shown)
    text = subprocess.run(["git", "show", f"{rev}:metrics/train.json"], cwd=project, capture_output=True,
                          text=True).stdout if rev else ""
    m = json.loads(text) if text else {}
    return {k: m.get(k) for k in ("tokens_per_second", "threads", "seconds", "final_loss", "peak_memory_mb", "mfu")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per experiment")
    parser.add_argument("--unshared", action="store_true", help="also a parallel pair with every core each")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="parallel-"))
    project = folder / "project"
    env = dict(os.environ, PATH=f"{ROOT / '.venv/bin'}:{os.environ['PATH']}",
               QLORA_CORES_DIR=str(folder / "cores"))
    env.pop("QLORA_THREADS", None)
    try:
        sh(["git", "clone", "-q", str(ROOT), str(project)], folder, env)
        (project / ".venv").symlink_to(ROOT / ".venv")
        sh(["dvc", "cache", "dir", "--local", str(ROOT / ".dvc/cache")], project, env)
        sh(["dvc", "checkout"], project, env)
        if subprocess.run(["dvc", "status", "--quiet"], cwd=project, env=env).returncode:
            raise SystemExit(f"the committed pipeline is not reproduced in {ROOT}'s cache: run `make repro` there")
        result = dict(steps=args.steps, export_when=EXPORT_WHEN, cores=len(os.sched_getaffinity(0)))
        result["serial_seconds"], result["serial"] = pair(project, env, [("serial-1", 1), ("serial-2", 2)],
                                                          args.steps, 1)
        result["parallel_seconds"], result["parallel"] = pair(project, env, [("parallel-3", 3), ("parallel-4", 4)],
                                                              args.steps, 2)
        result["ratio"] = round(result["parallel_seconds"] / result["serial_seconds"], 3)
        if args.unshared:
            unshared = dict(env, QLORA_THREADS=str(result["cores"]))
            result["unshared_parallel_seconds"], result["unshared_parallel"] = pair(
                project, unshared, [("unshared-5", 5), ("unshared-6", 6)], args.steps, 2)
            result["unshared_ratio"] = round(result["unshared_parallel_seconds"] / result["serial_seconds"], 3)
        result.update(provenance(project), command=command())
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=project, env=env, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
    out = ROOT / "benchmarks/results/parallel.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.endswith(("seconds", "ratio"))}, indent=2))


if __name__ == "__main__":
    main()

"""A new user's `make repro`: a fresh clone, its DVC cache empty, each stage timed, the console kept.

    python benchmarks/repro.py [--keep DIR]

Clones this repository's committed HEAD into a temporary folder, links this project's `.venv`
into it (the environment `make install` builds, so its time is not counted), runs `make repro`
there with an empty DVC cache (a stage whose outputs git holds and whose inputs did not change
is skipped) and writes:
- `benchmarks/results/repro.json`: the wall time of each stage (from the moment DVC starts it
  to the moment the next one starts), the whole run, a second `dvc repro` that finds nothing to
  do, what `git status` shows in the clone afterwards, the run's metrics, and the machine,
  versions, commit and date, and what the project takes on disk (cache and workspace, links
  counted once, against what copies would take; each output; the virtual environment);
- `benchmarks/results/repro-console.log`: what the console showed, as a terminal would (each
  progress bar at its last redraw before a new line).
README.md renders its stage table and docs/development.md the console from these (make docs).
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import PIPELINE  # noqa: E402
from qlora.outputs import provenance  # noqa: E402

# What the figures depend on (python -m tools.docs): make repro runs the pipeline, then tools.report exps
CODE = ["benchmarks/repro.py", "Makefile", "tools/report.py", *PIPELINE]

RESULTS = ROOT / "benchmarks/results"
STAGE = re.compile(r"Running stage '(\w+)'")
SKIPPED = re.compile(r"Stage '(\w+)' didn't change, skipping")


def as_terminal(raw):
    """Text as a terminal leaves it: of a line redrawn with carriage returns, its last drawing."""
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        drawn = [part for part in line.split("\r") if part.strip()]
        lines.append(drawn[-1] if drawn else "")
    return "\n".join(lines)


def run_timed(command, cwd, env):
    """Run `command`, its stdout and stderr merged; returns (console text, start time of each stage, end)."""
    start, starts, chunks = time.time(), {}, []
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        pending = ""
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            text = chunk.decode(errors="replace")
            chunks.append(text)
            pending += text
            *complete, pending = pending.split("\n")
            for line in complete:
                found = STAGE.search(line)
                if found:
                    starts[found.group(1)] = time.time() - start
        code = proc.wait()
    console = "".join(chunks)
    if code:
        raise SystemExit(f"{' '.join(command)} failed ({code}):\n{as_terminal(console)[-3000:]}")
    return console, starts, time.time() - start


def mb(path, apparent=False):
    """Megabytes on disk under `path` (du: a file linked twice counts once), or, `apparent`, the bytes
    the files hold, each link counted (what copies would take)."""
    out = subprocess.run(["du", "-s", "--block-size=1", *(["--apparent-size", "--count-links"] if apparent else []),
                          str(path)], capture_output=True, text=True, check=True).stdout
    return round(int(out.split()[0]) / 2**20, 1)


def disk(project, params):
    """What the reproduced project takes on disk: cache and workspace together (links counted once),
    what copies would take, each output, and the virtual environment."""
    paths = params["paths"]
    outputs = {name: mb(project / paths[name], apparent=True) for name in ("base", "quantized", "adapter", "export")}
    outputs["data"] = mb(project / paths["prepared"], apparent=True) + mb(project / paths["tokenized"], apparent=True)
    return dict(project_mb=mb(project), copies_mb=mb(project, apparent=True), outputs_mb=outputs,
                venv_mb=mb(ROOT / ".venv"), cache_type=subprocess.run(
                    [ROOT / ".venv/bin/dvc", "config", "cache.type"], cwd=project, capture_output=True,
                    text=True).stdout.strip())


def lock_changed(project):
    """The outputs that dvc.lock records with another hash than the cloned commit's: what this machine
    computed differently (on another CPU model, the adapter's bytes and the losses' last digits)."""
    committed = subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=project, capture_output=True, text=True,
                               check=True).stdout

    def outs(lock):
        return {o["path"]: o.get("md5") for stage in lock["stages"].values() for o in stage.get("outs", [])}

    before, after = outs(yaml.safe_load(committed)), outs(yaml.safe_load((project / "dvc.lock").read_text()))
    return sorted(path for path in after if after[path] != before.get(path))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, help="clone here and keep it, instead of a temporary folder")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="repro-"))
    project = folder / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
    (project / ".venv").symlink_to(ROOT / ".venv")
    for name in ("requirements.txt", "requirements-dev.txt"):  # the environment is built: make leaves it be
        subprocess.os.utime(project / name, (0, 0))
    env = dict(subprocess.os.environ, PATH=f"{ROOT / '.venv/bin'}:{subprocess.os.environ['PATH']}")
    try:
        console, starts, total = run_timed(["make", "repro"], project, env)
        noop = time.time()
        subprocess.run(["dvc", "repro"], cwd=project, env=env, check=True, capture_output=True)
        noop = time.time() - noop
        status = subprocess.run(["git", "status", "--short"], cwd=project, capture_output=True, text=True).stdout
        ordered = sorted(starts, key=starts.get)
        ends = [starts[name] for name in ordered[1:]] + [total]
        metrics = {path.stem: json.loads(path.read_text()) for path in sorted((project / "metrics").glob("*.json"))
                   if path.stem not in ("predictions", "base_answers", "confusion")}
        result = dict(
            command="make repro", stages={name: round(end - starts[name], 1) for name, end in zip(ordered, ends)},
            skipped=SKIPPED.findall(console),  # outputs committed in git, inputs unchanged: DVC need not run them
            total_seconds=round(total, 1), noop_seconds=round(noop, 2),
            # either column: DVC stages dvc.lock itself (core.autostage), the rest stays unstaged
            modified_after=[line[3:] for line in status.splitlines() if "M" in line[:2]],
            lock_changed=lock_changed(project),
            untracked_after=[line[3:] for line in status.splitlines() if line.startswith("??")],
            disk=disk(project, yaml.safe_load((project / "params.yaml").read_text())),
            metrics=metrics, **provenance(project))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "repro-console.log").write_text(as_terminal(console))
    (RESULTS / "repro.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("stages", "total_seconds", "noop_seconds", "modified_after")}, indent=2))


if __name__ == "__main__":
    main()

"""Writing stage outputs so that a failed stage leaves nothing that looks done.

Outputs are built in a temporary sibling and moved into place only when complete;
DVC records a stage in dvc.lock only after it exits 0, and a crash leaves at most a
`.tmp-*` folder that the next run removes.
"""

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# In the adapter folder, beside the weights: the train stage's figures (metrics/train.json) and its val
# curve, what the evaluate stage reads of the run; so one changed path, the adapter, carries a run
# from train to evaluate and export (what `dvc exp show --only-changed` shows as dependency hashes).
RUN_RECORD = "training.json"


def log(message):
    """One line per phase, to stderr so that stdout stays clean for tools."""
    print(f"[{Path(sys.argv[0]).stem if sys.argv[0] else 'qlora'}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a fresh temporary folder that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".tmp-{path.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are shared through DVC
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, data):
    """Write a small JSON file atomically (a reader never sees half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)



def provenance(cwd=None):
    """Where a measured figure comes from: the machine, the library versions, the commit and the date.
    Written beside every result that README or docs render."""
    import datetime
    import platform
    import re
    import subprocess
    from importlib.metadata import version

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd)
    return dict(
        machine=f"{found.group(1).strip() if found else platform.processor()}, {len(os.sched_getaffinity(0))} cores",
        versions={name: version(name) for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "dvc")},
        commit=commit.stdout.strip() or None,
        date=datetime.date.today().isoformat(),
    )


def prepare_hashes(lock="dvc.lock"):
    """DVC's content hash of each dependency and output of the prepare stage (the raw data, the prepared
    splits, its code), from dvc.lock: {path: md5}; {} before the first run."""
    import yaml

    lock = Path(lock)
    prepare = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("prepare", {}) if lock.exists() else {}
    return {e["path"]: e.get("md5") for e in prepare.get("deps", []) + prepare.get("outs", [])}

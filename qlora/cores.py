"""Share the CPU cores among the torch processes of this project that run at the same time.

Each torch process starts as many threads as there are cores. Two of them on the same cores
(two experiments of a `dvc queue start -j 2`, two `dvc repro` in two clones) spin against each
other: each runs several times slower than alone, and the pair takes longer than running them
one after the other. Here every stage that runs torch registers itself in a folder shared by
this user's processes, and sets its thread count to its fair share of the cores it may run on:
the cores divided by the processes registered at that moment, at least one. It looks again at
every training step and every scoring batch, so a run that started alone gives up cores when a
second starts, and takes them back when the other ends.

`QLORA_THREADS=N` fixes the count (the share is then not looked at); `QLORA_CORES_DIR` moves the
shared folder (default: the temporary folder, per user).
"""

import os
import tempfile
import time
from pathlib import Path

RECHECK_SECONDS = 1.0  # how often `rebalance` looks at the folder; cheaper calls return at once

_state = dict(entry=None, threads=None, fixed=None, checked=0.0, used=set())


def folder():
    return Path(os.environ.get("QLORA_CORES_DIR") or Path(tempfile.gettempdir()) / f"qlora-cores-{os.getuid()}")


def cores():
    """The cores this process may run on (its affinity: a container's or a taskset's limit)."""
    return len(os.sched_getaffinity(0))


def started(pid):
    """When process `pid` started (to tell it from a later process given the same pid), or None."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except psutil.Error:
        return None


def running():
    """The processes registered now; the entries of processes that ended without unregistering
    (killed) are removed on the way."""
    count = 0
    for entry in folder().glob("*.pid"):
        try:
            pid, since = int(entry.stem), float(entry.read_text() or 0)
        except (ValueError, OSError):
            continue
        if started(pid) == since:
            count += 1
        else:  # ended, or its pid now belongs to another process
            entry.unlink(missing_ok=True)
    return max(count, 1)


def fair_share():
    return max(1, cores() // running())


def _set(threads):
    import torch

    if threads != _state["threads"]:
        torch.set_num_threads(threads)
        _state["threads"] = threads
    _state["used"].add(threads)


def claim():
    """Register this process and take its share of the cores; call once, before torch works.
    Returns the thread count set."""
    import atexit

    fixed = os.environ.get("QLORA_THREADS")
    if fixed:
        if not fixed.isdigit() or int(fixed) < 1:
            raise SystemExit(f"QLORA_THREADS must be a positive number of threads, got {fixed!r}")
        _state["fixed"] = int(fixed)
        _set(int(fixed))
        return int(fixed)
    if _state["entry"] is None:
        folder().mkdir(parents=True, exist_ok=True)
        entry = folder() / f"{os.getpid()}.pid"
        entry.write_text(str(started(os.getpid())))
        _state["entry"] = entry
        atexit.register(release)
    _state["checked"] = time.monotonic()
    _set(fair_share())
    return _state["threads"]


def rebalance():
    """Take the fair share again if the processes running have changed; cheap between checks."""
    if _state["entry"] is None or _state["fixed"]:
        return
    now = time.monotonic()
    if now - _state["checked"] < RECHECK_SECONDS:
        return
    _state["checked"] = now
    _set(fair_share())


def release():
    entry, _state["entry"] = _state["entry"], None
    if entry is not None:
        entry.unlink(missing_ok=True)


def threads_used():
    """The thread counts this process ran with, smallest and largest (for the metrics)."""
    used = _state["used"] or {_state["threads"] or 0}
    return min(used), max(used)


def rebalance_callback():
    """A Trainer callback that rebalances before every optimizer step and evaluation batch."""
    from transformers import TrainerCallback

    class Rebalance(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            rebalance()

        def on_prediction_step(self, args, state, control, **kwargs):
            rebalance()

    return Rebalance()

"""Stages running at once share the cores instead of each taking all of them (qlora.cores).
How much faster that makes two parallel experiments is measured in benchmarks/bench_parallel.py,
never here."""

import os
import subprocess
import sys

import pytest
import torch

from qlora import cores


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CORES_DIR", str(tmp_path))
    monkeypatch.delenv("QLORA_THREADS", raising=False)
    monkeypatch.setattr(cores, "_state", dict(entry=None, threads=None, fixed=None, checked=0.0, used=set()))
    monkeypatch.setattr(cores, "RECHECK_SECONDS", 0.0)
    threads = torch.get_num_threads()
    yield tmp_path
    cores.release()
    torch.set_num_threads(threads)


def register(folder, pid, started):
    (folder / f"{pid}.pid").write_text(str(started))


def test_a_second_process_halves_the_share_and_its_end_gives_it_back(registry, monkeypatch):
    monkeypatch.setattr(cores, "cores", lambda: 4)
    assert cores.claim() == 4 and torch.get_num_threads() == 4
    assert [p.name for p in registry.iterdir()] == [f"{os.getpid()}.pid"]

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        register(registry, other.pid, cores.started(other.pid))
        cores.rebalance()
        assert torch.get_num_threads() == 2
    finally:
        other.kill()
        other.wait()
    cores.rebalance()
    assert torch.get_num_threads() == 4
    assert not (registry / f"{other.pid}.pid").exists(), "an ended process's entry is removed"
    assert cores.threads_used() == (2, 4)
    cores.release()
    assert not list(registry.iterdir())


def test_never_below_one_thread_and_a_reused_pid_does_not_count(registry, monkeypatch):
    monkeypatch.setattr(cores, "cores", lambda: 2)
    for n in range(3):  # three more processes than cores: each still gets a thread
        register(registry, 10**6 + n, 0)
    original = cores.started
    monkeypatch.setattr(cores, "started", lambda pid: 0 if pid >= 10**6 else original(pid))
    assert cores.claim() == 1
    # the same pids, now other processes (another start time): not ours, removed
    monkeypatch.setattr(cores, "started", lambda pid: 1 if pid >= 10**6 else original(pid))
    cores.rebalance()
    assert torch.get_num_threads() == 2 and len(list(registry.iterdir())) == 1


def test_qlora_threads_fixes_the_count(registry, monkeypatch):
    monkeypatch.setenv("QLORA_THREADS", "1")
    assert cores.claim() == 1 and not list(registry.iterdir())
    monkeypatch.setenv("QLORA_THREADS", "two")
    with pytest.raises(SystemExit, match="QLORA_THREADS must be a positive number of threads, got 'two'"):
        cores.claim()

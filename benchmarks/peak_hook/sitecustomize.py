"""Imported by every Python process started with this folder on PYTHONPATH (bench_train.py puts it
there for both tools, and `trl sft` passes it on to the process `accelerate launch` starts): at
exit, the process prints the most GPU memory torch allocated, measured the same way for both."""

import atexit
import sys


def _report():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"qlora-peak-cuda-mb: {torch.cuda.max_memory_allocated() / 2**20:.1f}", file=sys.stderr, flush=True)


atexit.register(_report)

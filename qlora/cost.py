"""What a training run cost: peak memory, and model FLOPs utilisation (MFU) counted for LoRA.

MFU = F x tokens/s / peak, where
- F = 4N + 12·L·d·T + 6·P_lora FLOPs per non-padding token: N the parameters of the base
  model's matmuls (the LM head included), whose forward (2N) and input-gradient backward (2N)
  run while their weights, frozen, get no gradient; 12·L·d·T the attention scores and
  their backward over T tokens of context, L layers, hidden size d; 6·P_lora the adapters'
  forward and full backward. Recomputation under gradient checkpointing is not counted: it is
  work the lever adds, not work the model needs.
- peak: the matmul FLOP/s this machine achieves in the dtype the run computed in (a large square
  matmul, timed), per core on CPU times the threads the run used, or the device's on a GPU. Cached
  outside the repository (`~/.cache/qlora/`, or `QLORA_CACHE`), since it is a fact of the machine,
  not of the experiment, keyed by what decides it: the CPU or GPU, the core count, torch, the dtype
  and any kernel cap in the environment (qlora/precision.py, `isa_cap`). A peak measured while the
  machine was busy is too low; the cache keeps the highest measured, and a run that beats it (an MFU
  above 1) has the peak measured again. An MFU above 1 is never recorded: if it persists, None is.
"""

import hashlib
import json
import os
import platform
import re
import resource
import time
from pathlib import Path


def peak_memory_mb():
    """The process's peak memory: on CUDA the most allocated by torch, else the peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def flops_per_token(config, mean_tokens, lora_parameters):
    """F = 4N + 12·L·d·T + 6·P_lora from a transformers config (see the module's docstring)."""
    text = getattr(config, "text_config", None) or config
    L, d = text.num_hidden_layers, text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    kv = head_dim * getattr(text, "num_key_value_heads", heads)
    q = head_dim * heads
    per_layer = d * q * 2 + d * kv * 2 + 3 * d * text.intermediate_size  # q and o, k and v, gated MLP
    n = L * per_layer + d * text.vocab_size  # the LM head runs whether or not it is tied
    return 4 * n + 12 * L * d * mean_tokens + 6 * lora_parameters


def machine_key(dtype="bfloat16"):
    """What decides the peak: the device, torch, the dtype, and the kernel caps in the environment."""
    import torch

    from qlora.precision import isa_cap

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo)
        name = f"{found.group(1).strip() if found else platform.processor()} x{os.cpu_count()}"
    return f"{name} torch {torch.__version__} {dtype}" + (f" {isa_cap()}" if isa_cap() else "")


def measure_peak(dtype="bfloat16", seconds=2.0):
    """Achieved matmul FLOP/s in `dtype`: per core on CPU (all cores of this process at work), the
    device's on CUDA."""
    import torch

    cuda = torch.cuda.is_available()
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, dtype=getattr(torch, dtype), device="cuda" if cuda else "cpu")
    b = torch.randn_like(a)
    previous = torch.get_num_threads()
    threads = len(os.sched_getaffinity(0))
    if not cuda:
        torch.set_num_threads(threads)
    try:
        a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        if cuda:
            torch.cuda.synchronize()
        flops = 2 * n**3 * count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return dict(per_core=flops / threads if not cuda else None, device=flops if cuda else None, threads=threads)


def _cache():
    return Path(os.environ.get("QLORA_CACHE") or Path.home() / ".cache/qlora") / "matmul-peak.json"


def peak(threads, dtype="bfloat16", remeasure=False):
    """The `dtype` matmul peak for `threads` CPU threads (or the GPU): the highest cached for this machine,
    or measured now (always with `remeasure`). A measurement is kept only if it beats the cached one and
    no other run of this project's was running beside it."""
    cache, key = _cache(), machine_key(dtype)
    known = json.loads(cache.read_text()) if cache.exists() else {}
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    m = known.get(digest)
    if m is None or remeasure:
        from qlora.cores import running

        measured = dict(machine=key, **measure_peak(dtype))
        if m is None or (measured["device"] or measured["per_core"]) > (m["device"] or m["per_core"]):
            m = measured
            if running() == 1:  # measured with no other run of ours beside it: kept
                known[digest] = m
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(known, indent=2))
    return m["device"] if m["device"] else m["per_core"] * threads


def mfu(config, mean_tokens, lora_parameters, tokens_per_second, threads, dtype="bfloat16"):
    """The run's MFU over the `dtype` peak; the peak measured again when the run beats the cached one, and
    None rather than a figure above 1."""
    achieved = flops_per_token(config, mean_tokens, lora_parameters) * tokens_per_second
    value = achieved / peak(threads, dtype)
    if value > 1:  # the cached peak was measured low (a busy machine): measure it again
        value = achieved / peak(threads, dtype, remeasure=True)
    return round(value, 4) if value <= 1 else None

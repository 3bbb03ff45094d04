"""The dtype the matmuls run in: `quantize.compute_dtype`, with `auto` resolved by the machine that runs
the model, where it is loaded (not by the machine that quantized it).

`auto` is:
- bfloat16 on a CUDA GPU that computes it (compute capability 8.0 and up: A100, H100, RTX 30xx on);
- float16 on an older GPU (T4, V100), trained with loss scaling (the Trainer's fp16);
- on a CPU, bfloat16 where its matmuls run natively (AVX512-BF16 or AMX), else float32. A CPU without
  them runs torch's bf16 matmul on a slow path, many times slower than float32 at the default's shapes
  (benchmarks/results/cpu-matmul-dtype.json, `bf16_over_float32`). What decides is a short timed probe,
  not the CPU's flags: kernels capped below the CPU's instructions (ONEDNN_MAX_CPU_ISA,
  ATEN_CPU_CAPABILITY) run the slow path on a CPU whose flags say bf16.

A model quantized with `auto` stores its weights that stay unquantized (embeddings, norms, the head) in
bfloat16 whatever the machine, so the quantize stage's output is the same everywhere. Where float32 is
resolved, those weights stay in bfloat16 storage and the hidden states and every matmul run in float32
(`compute_in`); explicit values store and compute in the dtype named, as the quantize stage always did.
"""

import functools
import os
import time
from dataclasses import dataclass

import torch

AUTO = "auto"
AUTO_STORAGE = "bfloat16"  # what `auto` stores unquantized weights in: half of float32, exact in either compute
# A CPU computes bf16 natively when its bf16 matmul takes at most this many times float32's: native kernels
# are about as fast as float32's or faster, the slow path an order of magnitude slower or more
# (benchmarks/results/cpu-matmul-dtype.json, `bf16_over_float32` of each kind of CPU).
NATIVE_UP_TO = 3.0
PROBE_SHAPE = (128, 576, 1536)  # tokens x in x out: a default batch's MLP matmul, cut to a few reps' worth
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


@dataclass(frozen=True)
class Precision:
    dtype: str  # the dtype the matmuls run in: bfloat16, float16 or float32
    reason: str  # why, in words for the console and the run's records: the same in every run on this machine
    measured: str = ""  # what the probe timed, for the console only (it differs from run to run)

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    def record(self):
        """The fields a stage writes into its records (train.json, evaluate.json, export.json)."""
        return dict(compute_dtype=self.dtype, compute_dtype_reason=self.reason)


def storage_dtype(setting):
    """The dtype the quantize stage stores unquantized weights in, for `quantize.compute_dtype` `setting`."""
    return AUTO_STORAGE if setting == AUTO else setting


def isa_cap():
    """The kernel caps set in the environment (read by torch at import), as one string; '' when none."""
    return " ".join(f"{v}={os.environ[v]}" for v in ISA_VARIABLES if os.environ.get(v))


@functools.cache
def cpu_bf16_over_float32(reps=3):
    """How many times longer a bf16 matmul takes than a float32 one on this CPU, one thread, best of `reps`
    each (interleaved, so that another process slows both alike)."""
    m, k, n = PROBE_SHAPE
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pairs = {dtype: (torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype))
                 for dtype in (torch.bfloat16, torch.float32)}
        best = dict.fromkeys(pairs, float("inf"))
        for dtype, (a, b) in pairs.items():
            a @ b  # first call: kernel selection and allocation
        for _ in range(reps):
            for dtype, (a, b) in pairs.items():
                start = time.perf_counter()
                a @ b
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return best[torch.bfloat16] / best[torch.float32]


def resolve(setting, device):
    """The Precision for `quantize.compute_dtype` `setting` on `device` ('cuda', 'cpu')."""
    if setting != AUTO:
        return Precision(setting, "set in params.yaml (quantize.compute_dtype)")
    if device == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision("bfloat16", f"auto: {torch.cuda.get_device_name()} computes bf16")
        major, minor = torch.cuda.get_device_capability()
        return Precision("float16", f"auto: {torch.cuda.get_device_name()} (compute capability {major}.{minor}) "
                                    "has no bf16; float16 with loss scaling")
    ratio = cpu_bf16_over_float32()
    capped = f" (kernels capped: {isa_cap()})" if isa_cap() else ""
    measured = f"a bf16 matmul took {ratio:.2f}x the time of a float32 one"
    if ratio <= NATIVE_UP_TO:
        return Precision("bfloat16", f"auto: this CPU multiplies bf16 natively{capped}", measured)
    return Precision("float32", f"auto: this CPU has no native bf16 matmul{capped}", measured)


def _head_in_compute_dtype(head, dtype, rows=8192):
    """Make a linear head whose weight is stored in another dtype multiply in `dtype`, `rows` of the
    vocabulary upcast at a time (a slice of the weight in float32, not all of it at once)."""
    plain = head.forward

    def forward(x):
        if head.weight.dtype == x.dtype:
            return plain(x)
        out = torch.cat([torch.nn.functional.linear(x, head.weight[start:start + rows].to(x.dtype))
                         for start in range(0, head.weight.shape[0], rows)], dim=-1)
        return out if head.bias is None else out + head.bias.to(x.dtype)

    head.forward = forward


def compute_in(model, precision):
    """Run a loaded quantized model in `precision`: its 4-bit layers' compute dtype, and the dtype of what
    runs outside them. Where float32 is resolved for weights stored in bfloat16, those weights keep their
    storage: the hidden states are cast at the embedding, so that every op after it (norms, attention, the
    quantized matmuls, LoRA, the head) runs in float32. Between two 16-bit dtypes (a bf16-stored model on a
    float16 GPU) the unquantized weights are cast instead. Returns the model."""
    import bitsandbytes as bnb

    dtype = precision.torch_dtype
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.compute_dtype = dtype
            layer.compute_type_is_set = True
    q = getattr(model.config, "quantization_config", None)
    if q is not None and hasattr(q, "bnb_4bit_compute_dtype"):
        q.bnb_4bit_compute_dtype = dtype
    storage = model.get_input_embeddings().weight.dtype
    if storage != dtype and dtype == torch.float32:
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.to(dtype))
        head = model.get_output_embeddings()
        if isinstance(head, torch.nn.Linear):
            _head_in_compute_dtype(head, dtype)
    elif storage != dtype:
        for param in model.parameters():
            if param.dtype == storage:
                param.data = param.data.to(dtype)
    model.compute_precision = precision
    return model

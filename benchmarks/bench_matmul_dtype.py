"""How much slower a bf16 matmul is than a float32 one on this CPU, at the default model's shapes.

    python benchmarks/bench_matmul_dtype.py [--reps 10] [--isa avx2]

The default computes in bf16 (quantize.compute_dtype). CPUs with AVX512-BF16 or AMX multiply bf16
natively; on others torch takes a slow path. One thread, so that another process on the machine
moves both dtypes alike. Writes `benchmarks/results/cpu-matmul-dtype.json`, each row with the CPU's
flags; the rows of a CPU of the other kind (native bf16 or not) are kept, so the file holds one of each.
`--isa avx2` caps oneDNN, MKL and torch's own kernels at AVX2 (ONEDNN_MAX_CPU_ISA,
MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY), the instructions a CPU without native bf16 has:
a machine with AVX512-BF16 or AMX then measures the other kind's path, and its rows say so
(`isa_cap`).
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CODE = ["benchmarks/bench_matmul_dtype.py"]  # torch's matmuls alone (python -m tools.docs)

# (tokens, in, out) of a default batch: 8 examples of about 75 tokens through SmolLM2's attention and MLP
SHAPES = [(600, 576, 576), (600, 576, 1536), (600, 1536, 576)]
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
NATIVE_BF16 = {"avx512_bf16", "amx_bf16"}  # either one: the CPU multiplies bf16 itself


def seconds(a, b, reps):
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return (time.perf_counter() - start) / reps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--isa", choices=["avx2"], default=None,
                        help="cap the instructions torch and oneDNN use (before torch is imported)")
    args = parser.parse_args()
    if args.isa:
        os.environ.update(ONEDNN_MAX_CPU_ISA=args.isa.upper(), MKL_ENABLE_INSTRUCTIONS=args.isa.upper(),
                          ATEN_CPU_CAPABILITY=args.isa)
    import torch

    from benchmarks.stamp import stamp
    from qlora.outputs import provenance

    torch.set_num_threads(1)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo, re.M).group(1).split()) if "flags" in cpuinfo else set()
    native = bool(flags & NATIVE_BF16) and not args.isa
    out = ROOT / "benchmarks/results/cpu-matmul-dtype.json"
    rows = [r for r in json.loads(out.read_text())["rows"] if r["native_bf16"] != native] if out.exists() else []
    for m, k, n in SHAPES:
        times = {}
        for dtype in ("bfloat16", "float32"):
            a = torch.randn(m, k, dtype=getattr(torch, dtype))
            b = torch.randn(k, n, dtype=getattr(torch, dtype))
            times[dtype] = seconds(a, b, args.reps)
        rows.append(stamp(dict(shape=[m, k, n], native_bf16=native, cpu_flags={f: f in flags for f in FLAGS},
                               **({"isa_cap": args.isa} if args.isa else {}),
                               bf16_s=round(times["bfloat16"], 5), float32_s=round(times["float32"], 5),
                               bf16_over_float32=round(times["bfloat16"] / times["float32"], 2))))
        print(rows[-1], flush=True)
    result = dict(rows=sorted(rows, key=lambda r: r["native_bf16"]), threads=1, reps=args.reps, **provenance())
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""How much slower a bf16 matmul is than a float32 one on this CPU, at the default model's shapes.

    python benchmarks/bench_matmul_dtype.py [--reps 10]

The default computes in bf16 (quantize.compute_dtype). CPUs with AVX512-BF16 or AMX multiply bf16
natively; on others torch takes a slow path. One thread, so that another process on the machine
moves both dtypes alike. Writes `benchmarks/results/cpu-matmul-dtype.json` with the CPU's flags.
"""

import argparse
import json
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


def seconds(a, b, reps):
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return (time.perf_counter() - start) / reps


def main():
    import torch

    from benchmarks.stamp import stamp
    from qlora.outputs import provenance

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo, re.M).group(1).split()) if "flags" in cpuinfo else set()
    rows = []
    for m, k, n in SHAPES:
        times = {}
        for dtype in ("bfloat16", "float32"):
            a = torch.randn(m, k, dtype=getattr(torch, dtype))
            b = torch.randn(k, n, dtype=getattr(torch, dtype))
            times[dtype] = seconds(a, b, args.reps)
        rows.append(stamp(dict(shape=[m, k, n], bf16_s=round(times["bfloat16"], 5), float32_s=round(times["float32"], 5),
                         bf16_over_float32=round(times["bfloat16"] / times["float32"], 2))))
        print(rows[-1], flush=True)
    result = dict(rows=rows, threads=1, reps=args.reps, cpu_flags={f: f in flags for f in FLAGS}, **provenance())
    out = ROOT / "benchmarks/results/cpu-matmul-dtype.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

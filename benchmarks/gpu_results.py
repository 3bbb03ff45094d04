"""benchmarks/results/gpu-*.json from what benchmarks/gpu.sh returned from a GPU machine.

    python benchmarks/gpu_results.py --setup-log DIR/log.txt --pipeline DIR/gpu-default-metrics.tar.gz \
        --pipeline-log DIR/log.txt [--quantize-8b DIR/llama3-8b-quantize.json] [--bench DIR/gpu-*-vs-trl.json ...]

bench_train.py wrote its results files on the GPU machine itself; they are copied as they are.
The default pipeline's run is summarised from the metrics its stages wrote there and from the
log: each stage's exit code and seconds, train's throughput and cost, evaluate's scores with
their intervals, the base model's. The logs are kept beside the results.
"""

import argparse
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks/results"

from benchmarks.stamp import PIPELINE  # noqa: E402

# What gpu-default-pipeline.json's figures depend on (python -m tools.docs): the pipeline as gpu.sh runs it there
CODE = ["benchmarks/gpu_results.py", "benchmarks/gpu.sh", *PIPELINE]


def device(setup_log):
    text = Path(setup_log).read_text()
    gpu = re.search(r"^(NVIDIA [^,]+), (\d+) MiB, ([\d.]+)$", text, re.M)
    versions = re.search(r"^(3\.\d+\.\d+) (\S+) NVIDIA .*? transformers (\S+) trl (\S+) peft (\S+) bnb (\S+)", text, re.M)
    return dict(gpu=gpu.group(1), memory_mib=int(gpu.group(2)), driver=gpu.group(3), python=versions.group(1),
                torch=versions.group(2), transformers=versions.group(3), trl=versions.group(4), peft=versions.group(5),
                bitsandbytes=versions.group(6))


def stages(log):
    found = re.findall(r"^=== stage-(\w+): rc (\d+) after (\d+) s$", Path(log).read_text(), re.M)
    return {name: dict(exit_code=int(rc), seconds=int(s)) for name, rc, s in found}


def pytest_run(xml):
    """Counts of the suite's run on CUDA, and each test that did not pass with its first message line."""
    import xml.etree.ElementTree as ET

    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    bad = [dict(test=f"{case.get('classname')}::{case.get('name')}", kind=child.tag,
                message=(child.get("message") or "").splitlines()[0][:300] if child.get("message") else "")
           for case in suite.iter("testcase") for child in case if child.tag in ("failure", "error")]
    return dict(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                seconds=float(suite.get("time", 0)), not_passed=bad)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup-log", required=True)
    parser.add_argument("--pipeline", required=True, help="gpu-default-metrics.tar.gz")
    parser.add_argument("--pipeline-log", required=True)
    parser.add_argument("--quantize-8b")
    parser.add_argument("--bench", nargs="*", default=[])
    parser.add_argument("--pytest", help="pytest-cuda.xml: the suite's run on CUDA (gpu.sh ci), as JUnit XML")
    parser.add_argument("--date", required=True, help="the day of the run, YYYY-MM-DD")
    parser.add_argument("--commit", required=True, help="the commit the machine ran (its working tree)")
    args = parser.parse_args()

    with tarfile.open(args.pipeline) as tar:
        read = {m.name: json.load(tar.extractfile(m)) for m in tar.getmembers()
                if m.name in ("metrics/train.json", "metrics/evaluate.json", "metrics/evaluate_base.json",
                              "metrics/quantize.json", "metrics/tokenize.json")}
    evaluate = read["metrics/evaluate.json"]
    found = device(args.setup_log)
    result = dict(
        device=found, date=args.date, commit=args.commit,
        stages=stages(args.pipeline_log),
        train=read["metrics/train.json"],
        evaluate={k: evaluate[k] for k in ("val_loss", "test_loss", "test_loss_ci_low", "test_loss_ci_high",
                                           "best_val_loss", "best_val_step", "test_accuracy", "test_accuracy_ci_low",
                                           "test_accuracy_ci_high", "test_macro_f1", "base_test_accuracy",
                                           "overfitting")},
        quantize={k: read["metrics/quantize.json"][k] for k in ("memory_footprint_mb", "bits_per_parameter")},
    )
    result["provenance"] = dict(  # the run's, as every row of a results file has its own
        commit=args.commit, date=args.date, machine=found["gpu"],
        versions={k: found[k] for k in ("torch", "transformers", "peft", "trl", "bitsandbytes")},
        command="bash benchmarks/gpu.sh ci")
    if args.pytest:
        result["pytest"] = pytest_run(args.pytest)
    if args.quantize_8b:
        result["llama3_8b_quantize"] = json.loads(Path(args.quantize_8b).read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu-default-pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.copy(args.pipeline_log, RESULTS / "gpu-default-pipeline.log")
    shutil.copy(args.setup_log, RESULTS / "gpu-setup.log")
    for bench in args.bench:
        shutil.copy(bench, RESULTS / Path(bench).name)
    print(json.dumps(result["stages"]), result["train"]["tokens_per_second"], result["evaluate"]["test_accuracy"])


if __name__ == "__main__":
    main()

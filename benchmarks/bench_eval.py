"""The evaluate stage's passes on the 4-bit model against the same passes in bf16 without quantization.

    python benchmarks/bench_eval.py [--reps 3] [--examples 48]

Needs a reproduced project (`make repro`). Loads models/quantized with the trained adapter
three ways, and times on each, alternating, `--reps` times:
- the val-loss pass (`qlora.scoring.completion_loss`, evaluate.batch_size per forward);
- greedy generation of the test answers (`qlora.scoring.generate_answers`, KV cache on).
The three models:
- `4-bit, bnb CPU path`: bitsandbytes' packed CPU inference path, as shipped (what the
  evaluate stages ran before `load_model` turned it off);
- `4-bit, training path`: as every stage loads it now (`qlora.models.load_model`:
  dequantize each weight, then a bf16 matmul, the path training takes);
- `bf16`: the same weights dequantized once into a plain bf16 model (no quantization).
Writes `benchmarks/results/eval-4bit-vs-bf16.json` (every timing, the medians, the val loss and
the answers' agreement with the bf16 model's, the machine, versions, commit and date), which
benchmarks/README.md renders (make docs), and prints the table.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import TRAIN_STAGE, UPSTREAM  # noqa: E402

# What the figures depend on (python -m tools.docs): the loading and scoring paths timed, the adapter's training
CODE = ["benchmarks/bench_eval.py", "qlora/scoring.py", "qlora/tasks.py", "stages/export.py", *TRAIN_STAGE,
        *UPSTREAM]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--examples", type=int, default=48, help="test examples generated for, val examples scored")
    args = parser.parse_args()

    import torch
    from peft import PeftModel

    from qlora.models import load_model
    from qlora.params import parse_params
    from qlora.scoring import answer_budget, completion_loss, generate_answers
    from qlora.splits import load_format, load_split
    from stages.export import dequantized
    from transformers import AutoTokenizer

    p = parse_params(ROOT / "params.yaml")
    paths = {k: str(ROOT / getattr(p.paths, k)) for k in ("quantized", "adapter", "tokenizer", "tokenized")}
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    val = load_split(paths["tokenized"], "val").select(range(args.examples))
    test = load_split(paths["tokenized"], "test").select(range(args.examples))
    b = p.evaluate.batch_size
    new = answer_budget(p.evaluate.max_new_tokens, load_split(paths["tokenized"], "train"))
    stop_ids = load_format(paths["tokenized"])["stop_token_ids"]

    def four_bit(training_path):
        return PeftModel.from_pretrained(load_model(paths["quantized"], p.quantize.compute_dtype,
                                                    bnb_cpu_inference=not training_path),
                                         paths["adapter"])

    models = {
        "4-bit, bnb CPU path": four_bit(False),
        "4-bit, training path": four_bit(True),
        "bf16": PeftModel.from_pretrained(dequantized(paths["quantized"], p.quantize.compute_dtype).to(torch.bfloat16),
                                          paths["adapter"]),
    }
    times = {name: {"loss": [], "generate": []} for name in models}
    answers, losses = {}, {}
    for rep in range(args.reps + 1):  # the first round warms up and is not counted
        for name, model in models.items():
            start = time.perf_counter()
            losses[name] = completion_loss(model, val, b)["loss"]
            middle = time.perf_counter()
            answers[name] = generate_answers(model, tokenizer, test, b, new, stop_ids)
            end = time.perf_counter()
            if rep:
                times[name]["loss"].append(middle - start)
                times[name]["generate"].append(end - middle)
                print(f"rep {rep} {name:22s} loss pass {middle - start:6.2f} s  generation {end - middle:6.2f} s",
                      flush=True)

    from benchmarks.stamp import stamp
    from qlora.outputs import provenance

    ref = times["bf16"]
    rows = {}
    for name, t in times.items():
        loss, gen = statistics.median(t["loss"]), statistics.median(t["generate"])
        rows[name] = stamp(dict(loss_pass_seconds=round(loss, 2), generation_seconds=round(gen, 2),
                          loss_pass_vs_bf16=round(loss / statistics.median(ref["loss"]), 2),
                          generation_vs_bf16=round(gen / statistics.median(ref["generate"]), 2),
                          loss_pass_runs=[round(x, 2) for x in t["loss"]], generation_runs=[round(x, 2) for x in t["generate"]],
                          val_loss=losses[name],
                          answers_as_bf16=round(sum(a == r for a, r in zip(answers[name], answers["bf16"]))
                                                / len(answers["bf16"]), 4)))
    result = dict(examples=args.examples, reps=args.reps, batch_size=b, max_new_tokens=new,
                  threads=torch.get_num_threads(), models=rows, **provenance())
    out = ROOT / "benchmarks/results/eval-4bit-vs-bf16.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

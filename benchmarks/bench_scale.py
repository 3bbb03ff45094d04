"""How the cost of each stage grows with the data: the default task at 1x, 4x, 16x and the whole list.

    python benchmarks/bench_scale.py [--steps 6] [--loss-examples 128] [--answers 64]

Clones this repository's committed HEAD into a temporary folder with this project's `.venv`
and DVC cache (the base and quantized models are checked out, not rebuilt). For each scale
it sets the data params (`data.max_per_label` 60, 240, 960 per label; then every package of
the Debian list: `data.labels: []`, no cap) and measures:
- `dvc repro tokenize` (validate, prepare and tokenize through DVC, outputs hashed and
  cached) and each of prepare and tokenize alone, over the whole data;
- a second `dvc repro tokenize`, which finds nothing to do;
- training: `--steps` optimizer steps of the train stage's own trainer after two warm-up
  steps, as seconds per 1,000 training examples (one epoch of 1,000 examples, extrapolated);
- evaluation: the loss pass over `--loss-examples` test examples and batched greedy answers to
  `--answers` of them, as seconds per 1,000 test examples, and the scoring of the whole test
  split (task metrics and their bootstrap intervals) on the references as answers.
Writes `benchmarks/results/scale.json` (each scale with the machine, versions, commit and date
of the run that measured it: `--scales` reruns some and keeps the others as they were) and
`docs/scale.png`; docs/scaling.md renders the table (make docs).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import TRAIN_STAGE, command, kept, stamp  # noqa: E402
from qlora.outputs import provenance  # noqa: E402

# What the figures depend on (python -m tools.docs): DVC over the data stages, the train stage's trainer, scoring
CODE = ["benchmarks/bench_scale.py", "benchmarks/scratch.py", "dvc.yaml", "params.yaml",
        "stages/validate.py", "stages/base.py", "stages/prepare.py", "stages/tokenize.py", "qlora/scoring.py", "qlora/tasks.py",
        *TRAIN_STAGE]

SCALES = {"1x": 60, "4x": 240, "16x": 960, "all": None}
ALL_TEMPLATE = "Debian section of this package.\nPackage: {package}\nDescription: {description}"


def timed(args, cwd, env):
    start = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return round(time.perf_counter() - start, 2)


def set_data(project, cap):
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    if cap is None:
        params["data"].update(labels=[], max_per_label=None, prompt_template=ALL_TEMPLATE)
    else:
        params["data"]["max_per_label"] = cap
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def train_seconds_per_1000(project, steps):
    """Seconds per 1,000 training examples: `steps` timed steps of the train stage's trainer."""
    from transformers import TrainerCallback

    from benchmarks.scratch import write_params
    from qlora.params import parse_params
    from stages.train import build_trainer

    class Clock(TrainerCallback):
        times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > 2:
                self.times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory(prefix="qlora-scale-") as tmp:
        params = write_params(Path(tmp), [f"train.max_steps={steps + 2}", "train.eval_steps=100000"])
        raw = yaml.safe_load(params.read_text())
        raw["paths"]["tokenized"] = str(project / "data/tokenized")
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        p = parse_params(params)
        clock = Clock()
        trainer = build_trainer(p, Path(tmp) / "out", [clock])
        trainer.args.eval_on_start = False
        trainer.args.eval_strategy = "no"  # the val split grows with the scale; its loss pass is timed apart
        trainer.train()
    per_step = sum(clock.times) / len(clock.times)
    return round(per_step / (p.train.batch_size * p.train.gradient_accumulation_steps) * 1000, 1)


def evaluation(project, loss_examples, answers):
    """Seconds per 1,000 test examples of the loss pass and of the answers, and the seconds to score
    the whole test split."""
    from transformers import AutoTokenizer

    from qlora.models import load_model
    from qlora.params import parse_params
    from qlora.scoring import example_losses, generate_answers, interval, metric_samples, resampled
    from qlora.splits import load_format, load_split
    from qlora.tasks import task_for

    p = parse_params(project / "params.yaml")
    test = load_split(project / "data/tokenized", "test")
    model = load_model(ROOT / p.paths.quantized, p.quantize.compute_dtype)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / p.paths.tokenizer)
    sample = test.select(range(min(loss_examples, len(test))))
    start = time.perf_counter()
    example_losses(model, sample, p.evaluate.batch_size)
    loss = (time.perf_counter() - start) / len(sample) * 1000
    sample = test.select(range(min(answers, len(test))))
    stop = load_format(project / "data/tokenized")["stop_token_ids"]
    start = time.perf_counter()
    generate_answers(model, tokenizer, sample, p.evaluate.batch_size, 8, stop)
    generation = (time.perf_counter() - start) / len(sample) * 1000
    task = task_for(p.evaluate.task, p.data.labels)
    start = time.perf_counter()
    references = list(test["completion"])
    _, rows = task.score(references, references)
    n = len(references)
    for values in metric_samples(task, rows, references, [1.0] * n, [1] * n, resampled(n)).values():
        interval(values)
    scoring = time.perf_counter() - start
    return dict(task=task.name, loss_seconds_per_1000=round(loss, 1), generation_seconds_per_1000=round(generation, 1),
                scoring_seconds=round(scoring, 2), test_examples=len(test))


def plot(result, png):
    import vl_convert

    measures = {"prepare_seconds": "prepare (s)", "tokenize_seconds": "tokenize (s)",
                "noop_seconds": "no-op dvc repro (s)", "scoring_seconds": "scoring the test split (s)"}
    values = [dict(examples=s["examples"], seconds=s[k], measure=title)
              for s in result["scales"].values() for k, title in measures.items()]
    spec = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json", "width": 480, "height": 300,
        "data": {"values": values},
        "mark": {"type": "line", "point": True},
        "encoding": {"x": {"field": "examples", "type": "quantitative", "scale": {"type": "log"},
                           "title": "examples after prepare"},
                     "y": {"field": "seconds", "type": "quantitative", "scale": {"type": "log"}},
                     "color": {"field": "measure", "type": "nominal", "title": None}},
    }
    png.write_bytes(vl_convert.vegalite_to_png(spec, scale=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps timed per scale")
    parser.add_argument("--loss-examples", type=int, default=128)
    parser.add_argument("--answers", type=int, default=64)
    parser.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="scale-"))
    project = folder / "project"
    env = dict(os.environ, PATH=f"{ROOT / '.venv/bin'}:{os.environ['PATH']}", PYTHONPATH=str(folder / "project"))
    scales = {}
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
        (project / ".venv").symlink_to(ROOT / ".venv")
        timed(["dvc", "cache", "dir", "--local", str(ROOT / ".dvc/cache")], project, env)
        timed(["dvc", "checkout"], project, env)
        for name in args.scales:
            set_data(project, SCALES[name])
            for output in ("data/prepared", "data/tokenized"):  # so that DVC has them to make at every scale
                shutil.rmtree(project / output, ignore_errors=True)
            repro = timed(["dvc", "repro", "--no-run-cache", "tokenize"], project, env)
            noop = timed(["dvc", "repro", "tokenize"], project, env)
            prepare = timed([sys.executable, "-m", "stages.prepare"], project, env)
            tokenize = timed([sys.executable, "-m", "stages.tokenize"], project, env)
            counts = json.loads((project / "metrics/prepare.json").read_text())
            tokens = json.loads((project / "metrics/tokenize.json").read_text())
            examples = counts["train_examples"] + counts["val_examples"] + counts["test_examples"]
            s = dict(examples=examples, train_examples=counts["train_examples"], dvc_repro_seconds=repro,
                     noop_seconds=noop, prepare_seconds=prepare, tokenize_seconds=tokenize,
                     train_tokens=tokens.get("train_tokens"))
            s["train_seconds_per_1000"] = train_seconds_per_1000(project, args.steps)
            s.update(evaluation(project, args.loss_examples, args.answers))
            # the command that refreshes this row alone
            scales[name] = stamp(s, project, command([sys.argv[0], "--steps", str(args.steps), "--loss-examples",
                                                      str(args.loss_examples), "--answers", str(args.answers),
                                                      "--scales", name]))
            print(name, json.dumps(s), flush=True)
        result = dict(steps=args.steps, loss_examples=args.loss_examples, answers=args.answers, scales=scales,
                      **provenance(project))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out = ROOT / "benchmarks/results/scale.json"
    if out.exists() and set(args.scales) != set(SCALES):  # some scales again: the others as they were, each
        # with its own provenance; the file's commit and date are this run's
        earlier = kept(json.loads(out.read_text()), "scales")
        result["scales"] = {name: scales.get(name, earlier.get(name)) for name in SCALES
                            if name in scales or name in earlier}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, ROOT / "docs/scale.png")
    print(f"wrote {out.relative_to(ROOT)} and docs/scale.png")


if __name__ == "__main__":
    main()

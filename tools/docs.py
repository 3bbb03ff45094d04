"""Render every measured figure of README.md, docs/ and benchmarks/README.md from the files the
pipeline and the benchmarks wrote, so that no figure is typed by hand and none can drift.

    make docs                        # python -m tools.docs: rewrite what sits between the markers
    python -m tools.docs --check     # exit 1, naming file and marker, if anything differs

Two kinds of marker, both HTML comments (GitHub shows only what is rendered between them):
- a table or paragraph made by a function of BLOCKS:
  `<!-- begin NAME (make docs) -->` ... `<!-- end NAME -->`;
- a figure inside prose, a Jinja2 expression over the result files:
  `<!-- = metrics.export.answer_agreement | pct -->98.3%<!-- / -->`.
The expressions see `metrics` (metrics/*.json), `results` (benchmarks/results/*.json) and
`reports` (reports/*.json), each by file stem.

`make docs` renders from the files in the workspace; `--check` from those files as git has them
at HEAD, so that a `make repro` on another CPU, whose metrics differ in their last digits, leaves
the check as it was: new figures are committed together with the pages they render into.

Every row of a results file (a variant, a scale, a tool's run, ...) carries the commit it was
measured at (its `provenance`, else its file's), and each file's script declares in `CODE` the
project files its figures depend on (benchmarks/stamp.py). A row is stale once one of them
differs from what it was at that commit, comments and docstrings aside; its table then says so
under it, with the command that refreshes it:

    python -m tools.docs --stale     # every stale row and the command that refreshes it
"""

import argparse
import ast
import errno
import hashlib
import json
import re
import subprocess
import sys
from collections import namedtuple
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # where the pages and result files are (a test points it elsewhere)
REPO = ROOT  # the git repository and its dvc.yaml, which the pages describe
FILES = ["README.md", "docs/*.md", "benchmarks/README.md"]
FOLDERS = dict(metrics="metrics", results="benchmarks/results", reports="reports")
BLOCK = re.compile(r"(<!-- begin ([\w-]+) \(make docs\) -->\n)(.*?)(<!-- end \2 -->)", re.S)
INLINE = re.compile(r"(<!-- = (.+?) -->)(.*?)(<!-- / -->)")
SOURCE = None  # None: render from the workspace's files; a commit: the files under FOLDERS as committed there
READ = set()  # the files under FOLDERS that the block being rendered read, as "folder/stem"
CACHE = {}  # what one run has worked out: git objects, fingerprints, stale rows


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def commit_of(rev):
    """The full hash of a commit of ROOT's repository, or None where git knows no such commit."""
    key = ("commit", str(ROOT), rev)
    if key not in CACHE:
        CACHE[key] = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}") or None if rev else None
    return CACHE[key]


def shown(commit, path):
    """The text of `path` at a commit (a full hash), or None where it did not exist there."""
    key = ("blob", str(ROOT), commit, path)
    if key not in CACHE:
        reader = CACHE.get(("reader", str(ROOT)))
        if reader is None:  # one `git cat-file` for every file read: a check reads a thousand
            reader = CACHE["reader", str(ROOT)] = subprocess.Popen(["git", "cat-file", "--batch"], cwd=ROOT,
                                                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        reader.stdin.write(f"{commit}:{path}\n".encode())
        reader.stdin.flush()
        header = reader.stdout.readline().split()  # "<hash> blob <size>", or "<name> missing"
        found = reader.stdout.read(int(header[2]) + 1)[:-1] if len(header) == 3 else None
        CACHE[key] = found.decode() if found is not None and header[1] == b"blob" else None
    return CACHE[key]


def text_of(relative):
    """A file under ROOT: from the workspace, or with SOURCE set, under FOLDERS, as committed there."""
    if SOURCE and any(relative.startswith(folder + "/") for folder in FOLDERS.values()):
        found = shown(SOURCE, relative)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "not committed", str(ROOT / relative))
        return found
    return (ROOT / relative).read_text()


def forget():
    """Drop what the last run worked out, and end its `git cat-file` readers."""
    for key, reader in CACHE.items():
        if key[0] == "reader":
            reader.stdin.close()
            reader.wait()
    CACHE.clear()


def read(name, folder="metrics"):
    READ.add(f"{folder}/{name}")
    return json.loads(text_of(f"{folder}/{name}.json"))


def default_scores():
    """The default run's base and fine-tuned scores on test, and its losses."""
    e, labels = read("evaluate"), read("labels")
    classes = len(labels["test"])
    rows = [
        (f"test accuracy ({classes} labels, chance {1 / classes:.1%})", "test_accuracy"),
        ("test macro F1", "test_macro_f1"),
        ("answered: the answer is exactly one label", "test_answered"),
        ("test loss on the answer tokens", "test_loss"),
    ]
    lines = ["| | base model (4-bit, no adapter) | fine-tuned (4-bit + LoRA), 95% interval |", "|---|---|---|"]
    lines += [f"| {title} | {e['base_' + key]} | **{e[key]}** [{e[key + '_ci_low']}, {e[key + '_ci_high']}] |"
              for title, key in rows]
    lines += ["", f"Gain in accuracy over the base model: {e['accuracy_gain']:+}, paired 95% interval "
                  f"[{e['accuracy_gain_ci_low']}, {e['accuracy_gain_ci_high']}] (`gain_significant: "
                  f"{str(e['gain_significant']).lower()}`); intervals are percentile bootstraps over the "
                  f"{sum(labels['test'].values())} test examples ([how](docs/data.md#scoring)).",
              "", f"Train-sample / val / test loss: {e['train_loss']} / {e['val_loss']} / {e['test_loss']} "
                  f"(gap {e['gap']}); best val loss {e['best_val_loss']} at step {e['best_val_step']}, last "
                  f"{e['last_val_loss']} at step {e['last_val_step']} (`overfitting: {str(e['overfitting']).lower()}`)."]
    return "\n".join(lines)


def noise_floor():
    """The spread of the default's metrics across training seeds (make noise, reports/noise.json)."""
    n, e = read("noise", "reports"), read("evaluate")
    names = dict(val_loss="val loss", test_loss="test loss", test_accuracy="test accuracy",
                 test_macro_f1="test macro F1", test_answered="answered", test_exact_match="test exact match",
                 test_chrf="test chrF", test_rouge_l="test ROUGE-L")
    lines = ["| metric | mean | std | min – max | spread (max − min) |", "|---|---|---|---|---|"]
    lines += [f"| {names.get(key, key)} | {m['mean']} | {m['std']} | {m['min']} – {m['max']} | {m['spread']} |"
              for key, m in n["metrics"].items()]
    seeds = ", ".join(str(s) for s in range(1, n["seeds"] + 1))
    half = (e["test_accuracy_ci_high"] - e["test_accuracy_ci_low"]) / 2
    acc = n["metrics"].get("test_accuracy")
    lines += ["", f"`train.seed` = {seeds}" + (" (and `data.seed` the same)" if n["data_seeds"] else "")
              + f", every other param the default; {n['machine']}, {n['date']}."
              + (f" One run's bootstrap interval of test accuracy is ±{half:.3f} wide; the seeds alone moved it "
                 f"by up to {acc['spread']}." if acc else "")]
    return "\n".join(lines)


def compare_page(folder, runs=False):
    """A real `make compare` page (written by python -m tools.report compare -o FOLDER): its summary,
    with `runs` first the table of runs (what `make exps` shows), then each run against the reference."""
    def make():
        c = read("compare", folder)
        lines = [c["summary"], ""]
        if runs:
            columns = ["experiment", *c["changed"], "val loss", "best val", "best step", "overfitting", "test loss",
                       "test acc", "tokens/s"]
            columns = [k for k in columns if k in c["runs"][0]]
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(r[k]) for k in columns) + " |" for r in c["runs"]]
            lines += [""]
        lines += [f"| experiment | metric | value | {c['ref']} | difference | 95% interval | verdict |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['experiment']} | {r['metric']} | {r['value']} | {r['reference']} | {r['difference']} | "
                  f"{r['interval']} | {r['verdict']} |" for r in c["against"]]
        lines += ["", f"{c['machine']}, {c['date']}."]
        return "\n".join(lines)

    return make


def stage_times():
    """Each stage of a fresh `make repro` (benchmarks/repro.py), its time and what it did, from that run."""
    r = read("repro", "benchmarks/results")
    m = r["metrics"]
    p, t, q, tr, e, b, x = (m[k] for k in ("prepare", "tokenize", "quantize", "train", "evaluate", "evaluate_base",
                                           "export"))
    did = dict(
        validate="params.yaml and the raw data checked",
        base="the GGUF file dequantized, saved as safetensors with its tokenizer",
        prepare=f"{p['raw_rows']:,} rows read; {p['train_examples']} train, {p['val_examples']} val, "
                f"{p['test_examples']} test examples ({p['dropped_other_label']:,} rows of other labels and "
                f"{p['dropped_duplicate']} duplicates left out)",
        tokenize=f"`{t['template']}` template, prompt masked; {t['train_tokens']:,} train tokens, "
                 f"{t['truncated']} truncated",
        quantize=f"{q['bits']}-bit: {q['memory_footprint_mb']} MB in memory, {q['ratio_to_bf16']}x of bf16 "
                 f"({q['bits_per_parameter']} bits per parameter)",
        train=f"{tr['trainable_parameters']:,} trainable parameters ({tr['trainable_fraction']:.2%}); {tr['steps']} "
              f"steps in {tr['epochs']:g} epochs, {tr['seconds']:.0f} s of them at {tr['tokens_per_second']} "
              f"tokens/s; final train loss {tr['final_loss']}",
        evaluate_base=f"the base model on test: loss {b['test_loss']}, {b['task']} scored on "
                      f"{p['test_examples']} generated answers",
        evaluate=f"the fine-tuned model on a train sample, val and test: val loss {e['val_loss']}, test loss "
                 f"{e['test_loss']}; {p['test_examples']} answers generated",
        export=f"adapter merged, saved in {x['dtype']} ({x['disk_mb']} MB); the same answer as the adapter on "
               f"{x['answer_agreement']:.0%} of test, test loss {x['test_loss']} vs {x['adapter_test_loss']}",
    )
    import yaml

    order = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    rows = {name: f"| {name} | {seconds:.0f} s | {did.get(name, '')} |" for name, seconds in r["stages"].items()}
    rows.update({name: f"| {name} | skipped | its outputs are committed in git and its inputs did not change |"
                 for name in r.get("skipped", [])})
    lines = ["| stage | time | what it did |", "|---|---|---|"]
    lines += [rows[name] for name in sorted(rows, key=lambda n: order.index(n) if n in order else len(order))]
    minutes, seconds = divmod(round(r["total_seconds"]), 60)
    lines += [f"| **total** | **{minutes} min {seconds} s** | `{r['command']}` in a fresh clone, its DVC cache empty |",
              "", f"{r['machine']}, {r['date']}. A second `dvc repro` right after found nothing to do in "
                  f"{r['noop_seconds']} s."]
    return "\n".join(lines)


# What a run costs, not what it found: train's figures, and their names in scores.json (stages/evaluate.py COST).
COST_KEYS = {"seconds", "tokens_per_second", "mfu", "peak_memory_mb", "threads", "tokens_s", "peak_mb"}


def after_repro():
    """What `git status` shows after a fresh clone's `make repro` on this machine (benchmarks/repro.py),
    and which metrics differ from those of the commit it cloned."""
    import subprocess

    r = read("repro", "benchmarks/results")
    changed = r["modified_after"]
    if not changed:
        return (f"on {r['machine']}, `git status` after `make repro` in a fresh clone showed no modified "
                "file: the run reproduced every committed output exactly.")
    differing = set()
    for stem, values in r["metrics"].items():
        shown = subprocess.run(["git", "show", f"{r['commit']}:metrics/{stem}.json"], cwd=REPO, capture_output=True,
                               text=True)
        if shown.returncode == 0:
            committed = json.loads(shown.stdout)
            differing |= {f"{stem}.{k}" for k in values.keys() | committed.keys() if values.get(k) != committed.get(k)}
    if "dvc.lock" not in changed:
        lock = "`dvc.lock` was not among them, so every data file, model and adapter had its committed hash"
    else:
        lock = ("`dvc.lock` among them, recording other hashes than the commit's for "
                + ", ".join(f"`{p}`" for p in r["lock_changed"]))
    return (f"on {r['machine']}, `git status` after `make repro` in a fresh clone showed {len(changed)} modified "
            f"files ({', '.join(f'`{f}`' for f in changed)}); {lock}"
            f", and the only metrics that differed from the commit's were "
            f"{', '.join(f'`{k}`' for k in sorted(differing)) or 'none'}"
            + (": measures of time, speed and memory, none a result." if differing and all(
                k.split(".", 1)[1] in COST_KEYS for k in differing) else "."))


def console():
    """The console of a fresh `make repro`, as a terminal left it (benchmarks/repro.py)."""
    r = read("repro", "benchmarks/results")
    log = text_of("benchmarks/results/repro-console.log").strip("\n")
    return "\n".join([f"`make repro` in a fresh clone, {r['machine']}, {r['date']}:", "", "```text", log, "```"])


def compute_dtype():
    """The default's train stage at each quantize.compute_dtype, as is and capped at AVX2
    (benchmarks/bench_compute_dtype.py)."""
    r = read("compute-dtype", "benchmarks/results")
    lines = ["| kernels | `compute_dtype` | computed in | steps | tokens/s | peak RSS (MB) | final loss |",
             "|---|---|---|---|---|---|---|"]
    for kernels, rows in (("as is", r["native"]), ("capped at AVX2", r["capped"])):
        for name, m in rows.items():
            lines.append(f"| {kernels} | {name} | {m['resolved']} | {m['steps']} | {m['tokens_per_second']} | "
                         f"{m['rss_mb']} | {m['final_loss'] if m['steps'] == r['steps'] else '(fewer steps)'} |")
    floor = r["seed_floor"]
    lines += ["", f"One run each, one after the other, {r['machine']}, {r['date']}. Capped at AVX2 (a CPU without "
                  f"native bf16), `auto` computed in {r['capped']['auto']['resolved']} and trained at "
                  f"{times(r['capped_auto_vs_bf16'], 1)} the tokens/s of forced bf16 there, and at "
                  f"{times(r['capped_auto_vs_native_auto'])} those of `auto` on the same CPU uncapped. Its final "
                  f"loss is {r['capped_auto_loss_difference']} from forced bf16's as is; the final losses of "
                  f"{floor['seeds']} seeds of that run (each the loss of its last batch, which the seed draws) "
                  f"spread over {floor['spread']}."]
    return "\n".join(lines)


def eval_4bit():
    """The evaluate stage's passes, 4-bit against bf16 (benchmarks/bench_eval.py)."""
    r = read("eval-4bit-vs-bf16", "benchmarks/results")
    titles = {"4-bit, bnb CPU path": "4-bit, bitsandbytes' packed CPU inference path (off in every stage)",
              "4-bit, training path": "4-bit, dequantize-then-matmul (every stage)",
              "bf16": "bf16, no quantization (the same weights, dequantized once)"}
    lines = ["| model | val-loss pass (s) | vs bf16 | generation (s) | vs bf16 | val loss | answers as bf16 |",
             "|---|---|---|---|---|---|---|"]
    for name, m in r["models"].items():
        lines.append(f"| {titles.get(name, name)} | {m['loss_pass_seconds']} | {times(m['loss_pass_vs_bf16'])} | "
                     f"{m['generation_seconds']} | {times(m['generation_vs_bf16'])} | {m['val_loss']} | "
                     f"{pct(m['answers_as_bf16'], 0)} |")
    runs = "; ".join(f"{name}: loss pass {min(m['loss_pass_runs'])}-{max(m['loss_pass_runs'])} s, generation "
                     f"{min(m['generation_runs'])}-{max(m['generation_runs'])} s" for name, m in r["models"].items())
    lines += ["", f"{r['examples']} val examples scored and {r['examples']} test answers generated (batch "
                  f"{r['batch_size']}, up to {r['max_new_tokens']} new tokens, KV cache on); medians of {r['reps']} "
                  f"runs after a warm-up round, {r['threads']} threads; {r['machine']}, {r['date']}. "
                  f"Range over the runs: {runs}."]
    return "\n".join(lines)


def profile(name):
    """Where one optimizer step goes: the operators by self time (benchmarks/profile_step.py)."""
    def make():
        r = read(name, "benchmarks/results")
        lines = ["| operator | self time per step (s) | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{o['name']}` | {o['seconds']} | {pct(o['share'])} | {o['calls']} |" for o in r["operators"]]
        lines += ["", f"{r['seconds_per_step']} s per step (mean of {r['steps_timed']} after {r['warmup']} warm-up "
                      f"steps), about {r['tokens_per_step']} non-padding tokens per step; overrides: "
                      f"{' '.join(f'`{o}`' for o in r['overrides']) or 'none'}; {r['machine']}, {r['date']}."]
        return "\n".join(lines)

    return make


def export_check():
    """How close the merged export is to the 4-bit base + adapter it came from (metrics/export.json)."""
    x = read("export")
    rows = [
        ("merge error (merged vs unmerged, both float32)", x["merge_max_abs_diff"]),
        ("max \\|logit diff\\| vs 4-bit base + adapter, float32 before the cast (the floor)",
         x["float32_max_abs_logit_diff"]),
        (f"max \\|logit diff\\| vs 4-bit base + adapter, {x['dtype']} export",
         f"**{x['max_abs_logit_diff']}** (mean {x['mean_abs_logit_diff']})"),
        ("same next token (argmax) at each position: export / float32 floor",
         f"{pct(x['argmax_agreement'])} / {pct(x['float32_argmax_agreement'])}"),
        ("same greedy answer on the test prompts", pct(x["answer_agreement"])),
        ("test loss, export vs adapter", f"{x['test_loss']} vs {x['adapter_test_loss']}"),
    ]
    primary = next(k[5:] for k in x if k.startswith("test_") and k != "test_loss")
    rows.append((f"test {primary}, export vs adapter (paired 95% interval of the difference)",
                 f"{x['test_' + primary]} vs {x['adapter_test_' + primary]} "
                 f"([{x[primary + '_diff_ci_low']}, {x[primary + '_diff_ci_high']}])"))
    lines = ["| | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    lines += ["", f"{x['dtype']} export, {x['disk_mb']} MB on disk; logits compared on {x['check_examples']} test "
                  f"examples, answers and scores on the whole test split."]
    return "\n".join(lines)


def export_cast():
    """What a bf16 cast of the merged weights keeps of the adapter, by how long it trained
    (benchmarks/bench_export_cast.py)."""
    rows = read("export-cast", "benchmarks/results")["rows"]
    loss = lambda v: "" if v is None else v  # noqa: E731
    lines = ["| run | steps | update / weight (median) | bf16 cast error / update | float16 cast error / update "
             "| test loss: base / adapter | bf16 export (its share of the gain) | written |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        bf16 = (f"{r['export_test_loss']} ({pct(r['export_gain_kept'])})" if r["dtype"] == "bfloat16"
                else f"{loss(r['bfloat16_test_loss'])} ({pct(r['bfloat16_gain_kept'])}): refused")
        written = f"{r['dtype']}, test loss {r['export_test_loss']}" if r["exported"] else "nothing"
        lines.append(f"| {name} | {r['steps']} | {pct(r['update_over_weight_median'], 2)} "
                     f"| {pct(r['bfloat16_cast_error_over_update'])} | {pct(r['float16_cast_error_over_update'])} "
                     f"| {r['base_test_loss']} / {r['adapter_test_loss']} | {bf16} | {written} |")
    first = next(iter(rows.values()))
    grid = {r["base_weights_on_bf16_grid"] for r in rows.values()}
    lines += ["", f"`lora.r` {', '.join(map(str, sorted({r['lora_r'] for r in rows.values()})))}; compute dtype "
                  f"{first['compute_dtype']}; {first['merged_layers']} merged layers; share of base weights a bf16 "
                  f"cast leaves as they are: {', '.join(pct(g) for g in sorted(grid))}; export.loss_tolerance "
                  f"{first['loss_tolerance']}; {first['provenance']['machine']}, {first['provenance']['date']}."]
    return "\n".join(lines)


def levers_speed():
    """What each speed lever costs and saves in the train stage (benchmarks/bench_levers.py)."""
    r = read("levers", "benchmarks/results")
    lines = ["| variant | `-S` | non-padding tokens/s | vs default | peak RSS (MB) | vs default | final train loss |",
             "|---|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {' '.join(f'`{o}`' for o in v['overrides']) or '(none)'} | {v['tokens_per_second']} | "
                     f"{times(v['speed_vs_default'])} | {v['rss_mb']:.0f} | {times(v['memory_vs_default'])} | "
                     f"{v['final_loss']} |")
    spread = max(max(x["tokens_per_second"] for x in v["runs"]) / min(x["tokens_per_second"] for x in v["runs"]) - 1
                 for v in r["variants"].values())
    lines += ["", f"The train stage on the default data and model, {r['steps']} steps per run; medians of {r['reps']} "
                  f"rounds, each running every variant in turn; runs of one variant differed by up to {pct(spread)} in "
                  f"tokens/s. {r['machine']}, {r['date']} (benchmarks/bench_levers.py)."]
    return "\n".join(lines)


def experiment_cost():
    """Each stage's seconds in a first run and in a one-lever experiment, and the checks over training
    (benchmarks/bench_stages.py)."""
    r = read("stage-times", "benchmarks/results")
    stages = ["train", "evaluate", "export"]
    lines = ["| model | run | " + " | ".join(stages) + " | evaluate / train | export / train |",
             "|---|---|" + "---|" * (len(stages) + 2)]
    notes = []
    for m in r["models"]:
        runs = [("`dvc repro`, first run", m["first_run"]), (f"`dvc exp run -S {m['experiment']['lever']}`",
                                                          m["experiment"]["stages"])]
        for title, seconds in runs:
            lines.append(f"| {m['model']} | {title} | " + " | ".join(f"{seconds[s]:.0f} s" for s in stages) + " | "
                         + " | ".join(times(seconds[s] / seconds["train"]) for s in ("evaluate", "export")) + " |")
        first = ", ".join(f"{k} {v:.0f} s" for k, v in m["first_run"].items() if k not in stages)
        p = m["provenance"]
        notes.append(f"- {m['model']}: overrides {' '.join(f'`{o}`' for o in m['overrides']) or 'none'}; the first "
                     f"run's other stages: {first}; {p['machine']}, {p['date']}.")
    return "\n".join(lines + [""] + notes)


def parallel():
    """Two experiments side by side against one after the other (benchmarks/bench_parallel.py)."""
    r = read("parallel", "benchmarks/results")
    rows = [("one after the other (`dvc queue start`)", r["serial_seconds"], r["serial"]),
            ("side by side (`dvc queue start -j 2`)", r["parallel_seconds"], r["parallel"])]
    if "unshared_parallel_seconds" in r:
        rows.append(("side by side, every process on every core (`QLORA_THREADS`)", r["unshared_parallel_seconds"],
                     r["unshared_parallel"]))
    each = all(m.get("tokens_per_second") for _, _, runs in rows for m in runs.values())  # recorded since
    lines = ["| two experiments | wall time (s) | vs one after the other |"
             + (" train tokens/s of each | threads of each |" if each else ""), "|---|---|---|" + ("---|---|" if each else "")]
    for title, seconds, runs in rows:
        lines.append(f"| {title} | {seconds:.0f} | {times(seconds / r['serial_seconds'])} |" + (
            " " + " / ".join(str(m["tokens_per_second"]) for m in runs.values()) + " | "
            + " / ".join(str(m["threads"]) for m in runs.values()) + " |" if each else ""))
    lines += ["", f"Each experiment: the default with another `train.seed`, {r['steps']} optimizer steps, then "
                  + ("evaluate and export" if r.get("export_when", "always") == "always" else
                   f"evaluate (`export.when: {r['export_when']}`)") + f"; {r['machine']}, {r['date']}."]
    return "\n".join(lines)


def tail(r, key="tail_loss", unit=""):
    """` (value)` for a results key that files written before it existed lack."""
    return f" ({r[key]:.4g}{unit})" if r.get(key) is not None else ""


def train_vs_trl(name="train-vs-trl"):
    """Our train stage against `trl sft`, like for like (benchmarks/bench_train.py), on CPU or a GPU."""
    def make():
        r = read(name, "benchmarks/results")
        gpu = r.get("device", "cpu") != "cpu"
        memory = "peak GPU memory (MB)" if gpu else "peak RSS (MB)"
        means = " (mean of the last tenth of the steps)" if r.get("tail_loss_difference_pct") is not None else ""
        lines = [f"| | non-padding tokens/s | tokens counted | {memory} | whole process (s) | final train loss{means} "
                 "| MFU |",
                 "|---|---|---|---|---|---|---|"]
        for tool, m in r["tools"].items():
            lines.append(f"| {tool} | {m['tokens_per_second']:.1f} | {m['tokens']:.0f} | "
                         f"{m['gpu_peak_mb' if gpu else 'rss_mb']:.0f} | {m['wall']:.0f} | "
                         f"{m['final_loss']}{tail(m)} | "
                         f"{pct(m['mfu'])} |")
        lines.append(f"| **ours / trl sft** | **{times(r['speed_ratio'])}** | {times(r['tokens_ratio'])} | "
                     f"{times(r['gpu_memory_ratio' if gpu else 'memory_ratio'])} | {times(1 / r['wall_ratio'])} | "
                     f"{r['loss_difference_pct']}% apart{tail(r, 'tail_loss_difference_pct', '%')} | |")
        if r.get("same_checkpointing"):  # ours at trl sft's recompute (every layer), where our default differs
            same = r["same_checkpointing"]
            lines.append(f"| ours, checkpointing every layer / trl sft | {times(same['speed_ratio'])} | | "
                         f"{times(same['memory_ratio'])} | | | |")
        model = r.get("model", {})
        shape = (f"{model['base']} ({model['layers']} layers, hidden {model['hidden_size']}, vocabulary "
                 f"{model['vocab_size']}); " if gpu and model else "")
        packed = f"packed rows of {r['pack']} tokens; " if r.get("pack") else ""
        where = (f"{r['device']}, MFU over its measured bf16 matmul peak of {r['peak_flops'] / 1e12:.0f} TFLOP/s"
                 if gpu else f"{r['threads']} threads; MFU over a measured bf16 matmul peak of "
                             f"{r['peak_flops'] / 1e9:.0f} GFLOP/s")
        lines += ["", f"{shape}{packed}{r['steps']} optimizer steps per run, "
                      f"{'medians of ' + str(r['reps']) + ' alternating runs' if r['reps'] > 1 else 'one run'} of each; "
                      f"overrides of ours: {' '.join(f'`{o}`' for o in r['overrides']) or 'none'}; "
                      f"{where} at {r['flops_per_token'] / 1e6:.0f} MFLOP per token; "
                      f"{r['machine']}, {r['date']}."]
        return "\n".join(lines)

    return make


def gpu_pipeline():
    """The default pipeline's stages run on a GPU (benchmarks/gpu.sh, benchmarks/gpu_results.py)."""
    r = read("gpu-default-pipeline", "benchmarks/results")
    d, t, e = r["device"], r["train"], r["evaluate"]
    lines = ["| stage | " + " | ".join(r["stages"]) + " |", "|---|" + "---|" * len(r["stages"]),
             "| seconds | " + " | ".join(str(s["seconds"]) for s in r["stages"].values()) + " |",
             "| exit code | " + " | ".join(str(s["exit_code"]) for s in r["stages"].values()) + " |"]
    lines += ["", f"Train: {t['steps']} steps, {t['tokens_per_second']} tokens/s, MFU {pct(t['mfu'], 2)}, peak GPU "
                  f"memory {t['peak_memory_mb']} MB, attention {t['attention']}. Evaluate: val loss {e['val_loss']}, "
                  f"test loss {e['test_loss']} [{e['test_loss_ci_low']}, {e['test_loss_ci_high']}], test accuracy "
                  f"{e['test_accuracy']} [{e['test_accuracy_ci_low']}, {e['test_accuracy_ci_high']}] (base "
                  f"{e['base_test_accuracy']}). {d['gpu']}, driver {d['driver']}, torch {d['torch']}, "
                  f"transformers {d['transformers']}, trl {d['trl']}, bitsandbytes {d['bitsandbytes']}; "
                  f"{r['commit']}, {r['date']}."]
    return "\n".join(lines)


def scale():
    """How each stage's cost grows with the data (benchmarks/bench_scale.py)."""
    r = read("scale", "benchmarks/results")
    lines = ["| scale | examples | `dvc repro` prepare + tokenize (s) | prepare (s) | tokenize (s) | no-op `dvc repro` (s) | "
             "train s / 1,000 examples | loss pass s / 1,000 test | answers s / 1,000 test | scoring the test split (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in r["scales"].items():
        lines.append(f"| {name} | {m['examples']:,} | {m['dvc_repro_seconds']} | {m['prepare_seconds']} | "
                     f"{m['tokenize_seconds']} | {m['noop_seconds']} | {m['train_seconds_per_1000']} | "
                     f"{m['loss_seconds_per_1000']} | {m['generation_seconds_per_1000']} | {m['scoring_seconds']} "
                     f"({m['test_examples']:,}, {m['task']}) |")
    lines += ["", f"Training: {r['steps']} optimizer steps timed after two warm-up steps; the loss pass over "
                  f"{r['loss_examples']} and batched answers to {r['answers']} test examples; prepare and tokenize "
                  f"each as a process of its own, imports included. {r['machine']}, {r['date']}."]
    return "\n".join(lines)


def bring_your_model(name):
    """A new user's run on their own model and data (benchmarks/bring_your_model.py), as a table."""
    def make():
        r = read(name, "benchmarks/results")
        b, f, primary = r["base"], r["fine_tuned"], r["primary"]
        from qlora.tasks import TASKS

        task = TASKS[r["task"]]
        rows = [(task.described[k], f"test_{k}") for k in task.metrics]
        rows.append(("test loss on the answer tokens", "test_loss"))
        ref = [task.reference] if task.reference else []  # a trivial predictor on the same examples

        def interval(values, key):
            low, high = values.get(f"{key}_ci_low"), values.get(f"{key}_ci_high")
            return f" [{low}, {high}]" if low is not None else ""

        lines = ["| | base model (4-bit, no adapter) | fine-tuned (4-bit + LoRA) |" + "".join(f" {n} |" for n in ref),
                 "|---|---|---|" + "---|" * len(ref)]
        lines += [f"| {title} | {b[key]}{interval(b, key)} | **{f[key]}**{interval(f, key)} |"
                  + "".join(f" {f.get('test_' + task.reference_keys.get(key[5:], ''), '')} |" for _ in ref)
                  for title, key in rows]
        t = r["train"]
        versus = task.versus_reference and f"test_{task.versus_reference}"
        lines += [
            "",
            *([f"Against {task.reference}, on the same test examples: {task.versus_reference} {f[versus]:+}, paired 95% "
               f"bootstrap interval [{f[versus + '_ci_low']}, {f[versus + '_ci_high']}] (below 0: the fine-tuned model "
               f"is the better predictor). Here the fine-tuned model is "
               + ("the better predictor" if f[versus + "_ci_high"] < 0 else
                  "the worse predictor" if f[versus + "_ci_low"] > 0 else "not told apart from it") + ".", ""]
              if versus else []),
            f"Fine-tuned minus base model in {primary}: {r['gain']:+}, paired 95% bootstrap interval [{r['gain_ci_low']}, "
            f"{r['gain_ci_high']}] over the {r['test_examples']} test examples. Model: `{r['model_type']}`, "
            f"{r['parameters'] / 1e6:.0f}M parameters, a vocabulary of {r['vocab_size']:,} tokens; format "
            f"`{r['template']}` (system prompt: {r['system_prompt']}), answers ending at {', '.join(f'`{t}`' for t in r['stop_tokens'])}. "
            f"{t['steps']} steps in {t['seconds']:.0f} s ({t['tokens_per_second']} tokens/s); the whole "
            f"`dvc repro` {r['repro_seconds']} s on {r['machine']}. The merged export: test loss "
            f"{r['export']['test_loss']} (adapter {r['export']['adapter_test_loss']}), the same answer on "
            f"{r['export']['answer_agreement']:.0%} of test"
            + (f"; the GGUF file {r['export']['gguf_file']} as read back: test loss {r['export']['gguf_test_loss']}, "
               f"the same answer on {r['export']['gguf_answer_agreement']:.0%}." if "gguf_file" in r["export"] else "."),
            "",
            "The edits to the fresh clone's `params.yaml`, all of them:",
            "",
            "```",
            *r["edits"],
            "```",
        ]
        return "\n".join(lines)

    return make


def gguf_check():
    """The GGUF file against the 4-bit base + adapter it came from (metrics/export.json)."""
    e = read("export")
    primary = next(k[len("gguf_test_"):] for k in e if k.startswith("gguf_test_") and k != "gguf_test_loss")
    return "\n".join([
        "| | value |", "|---|---|",
        f"| file | `{e['gguf_file']}`, {e['gguf_mb']} MB (the bf16 safetensors: {e['disk_mb']} MB) |",
        f"| max \\|logit diff\\| vs 4-bit base + adapter | {e['gguf_max_abs_logit_diff']} (mean "
        f"{e['gguf_mean_abs_logit_diff']}) |",
        f"| same next token (argmax) at each position | {pct(e['gguf_argmax_agreement'])} |",
        f"| same greedy answer on the test prompts | {pct(e['gguf_answer_agreement'])} |",
        f"| test loss, GGUF vs adapter | {e['gguf_test_loss']} vs {e['adapter_test_loss']} |",
        f"| test {primary}, GGUF vs adapter (paired 95% interval of the difference) | {e[f'gguf_test_{primary}']} vs "
        f"{e[f'adapter_test_{primary}']} ([{e[f'gguf_{primary}_diff_ci_low']}, {e[f'gguf_{primary}_diff_ci_high']}]) |",
        f"| chat template inside | {'yes' if e['gguf_chat_template'] else 'no (a base model)'} |",
        "", f"Logits compared on {e['check_examples']} test examples, answers and scores on the whole test split."])


def lora_variants():
    """The LoRA variants on the default, one lever each (benchmarks/bench_variants.py)."""
    r = read("lora-variants", "benchmarks/results")
    base = r["variants"]["default (kaiming)"]
    lines = ["| variant | `-S` | val loss | test accuracy [95% interval] | test loss | train tokens/s | vs default | "
             "peak RSS (MB) | trainable parameters |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        sets = " ".join(f"`{o}`" for o in v["overrides"]) or "(none)"
        if "error" in v:
            lines.append(f"| {name} | {sets} | failed: {v['error']} | | | | | | |")
            continue
        lines.append(f"| {name} | {sets} | {v['val_loss']} | {v['test_accuracy']} [{v['test_accuracy_ci_low']}, "
                     f"{v['test_accuracy_ci_high']}] | {v['test_loss']} | {v['tokens_per_second']} | "
                     f"{times(v['tokens_per_second'] / base['tokens_per_second'])} | {v['peak_memory_mb']:.0f} | "
                     f"{v['trainable_parameters']:,} |")
    lines += ["", f"The default params with one change each: the same data, seed and {base['steps']} steps; train and "
                  f"evaluate as DVC experiments (`variant-*`), one at a time. {r['machine']}, {r['date']}."]
    return "\n".join(lines)


def tune_study(study):
    """A `make tune` study: its trials, the best one and the importances (reports/tune/<study>.json)."""
    def make():
        from tools.report import markdown_table
        from tools.tune import fmt, trials_table

        r = read(study, "reports/tune")
        best = r["best"]
        lines = [trials_table(r, markdown_table), "",
                 f"Objective: {r['direction']} `{r['objective']}` on the val split, {len(r['trials'])} trials "
                 f"({sum(t['value'] is not None for t in r['trials'])} finished). Best: **{best['experiment']}**, "
                 f"{r['objective']} {fmt(best['value'])}, with "
                 + ", ".join(f"`{k}={fmt(v)}`" for k, v in best["params"].items())
                 + f"; `dvc exp apply {best['experiment']}` restores it. {r['machine']}, {r['date']}."]
        if r["importances"]:
            lines += ["", "Parameter importances (Optuna's fANOVA; with this few trials, a rough guide): "
                      + ", ".join(f"{k} {fmt(v)}" for k, v in r["importances"].items()) + "."]
        return "\n".join(lines)

    return make


def faults():
    """The fault table: every `@pytest.mark.fault(fault, sees=..., lost=...)` of the tests, with its test."""
    import ast

    rows = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            for mark in node.decorator_list:
                if isinstance(mark, ast.Call) and ast.unparse(mark.func) == "pytest.mark.fault":
                    fault = ast.literal_eval(mark.args[0])
                    kw = {k.arg: ast.literal_eval(k.value) for k in mark.keywords}
                    rows.append(f"| {fault} | {kw['sees']} | {kw['lost']} | `{path.name}::{node.name}` |")
    return "\n".join(["| fault | what you see | what is lost | tested by |", "|---|---|---|---|", *rows])


def tune_workers():
    """A study of the default by several workers and the same budget by one (bench_tune_workers.py)."""
    from tools.report import markdown_table
    from tools.tune import best_line, trials_table

    r = read("tune-workers", "benchmarks/results")
    lines = []
    for study in r["studies"]:
        pruned = [t for t in study["trials"] if t["state"] == "pruned"]
        lines += [f"**{study['study']}**: {study['workers']} worker(s), {study['process_seconds']:.0f} s from the "
                  f"first worker's start to the last one's exit; {len(pruned)} of {study['budget']} trials pruned"
                  + (f" ({', '.join(str(t['number']) for t in pruned)})" if pruned else "") + ".", "",
                  trials_table(study, markdown_table), "", best_line(study) + ".", ""]
    lines += [f"Wall time of one worker over that of {r['studies'][0]['workers']}: {r['speedup']}x, "
              f"on {r['cores']} cores ({r['machine']}, {r['date']}, commit {r['commit'][:7]})."]
    return "\n".join(lines)


BLOCKS = {
    "faults": faults,
    "tune-workers": tune_workers,
    "lora-variants": lora_variants,
    "gguf-check": gguf_check,
    "tune-study": tune_study("lr-r-dropout"),
    "default-scores": default_scores,
    "noise-floor": noise_floor,
    "compare-example": compare_page("docs/compare-example"),
    "lr-sweep": compare_page("docs/lr-sweep", runs=True),
    "byom-gemma3": bring_your_model("gemma3-270m-writing-systems"),
    "byom-debian-sizes": bring_your_model("debian-sizes"),
    "stage-times": stage_times,
    "after-repro": after_repro,
    "console": console,
    "eval-4bit": eval_4bit,
    "compute-dtype": compute_dtype,
    "profile-step": profile("profile-step"),
    "levers-speed": levers_speed,
    "export-check": export_check,
    "export-cast": export_cast,
    "parallel": parallel,
    "experiment-cost": experiment_cost,
    "scale": scale,
    "train-vs-trl": train_vs_trl(),
    "gpu-pipeline": gpu_pipeline,
    "gpu-train-vs-trl": train_vs_trl("gpu-train-vs-trl"),
    "gpu-llama3-8b": train_vs_trl("gpu-llama3-8b-vs-trl"),
}


# ---- which rows were measured on code that has changed since ----

Written = namedtuple("Written", "code rows refresh label", defaults=(None,))
GPU = " on a GPU machine (benchmarks/README.md), then `benchmarks/gpu_results.py` on what it returned"
# reports/noise.json (python -m tools.report noise): seed experiments of the pipeline, summarised by tools/report.py
NOISE_CODE = ["tools/report.py", "*PIPELINE"]


# Each results file (by folder and stem): the script that writes it and declares its CODE (or a list of the
# files), where its rows are (None: the file is one record), and the command that refreshes a row.
RESULTS = {
    "benchmarks/results/train-vs-trl": Written(
        "benchmarks/bench_train.py", "tools", ".venv/bin/python benchmarks/bench_train.py --steps 78 --reps 2"),
    "benchmarks/results/levers": Written(
        "benchmarks/bench_levers.py", "variants", ".venv/bin/python benchmarks/bench_levers.py --steps 15 --reps 2"),
    "benchmarks/results/lora-variants": Written(
        "benchmarks/bench_variants.py", "variants", ".venv/bin/python benchmarks/bench_variants.py --only '{row}'"),
    "benchmarks/results/scale": Written(
        "benchmarks/bench_scale.py", "scales", ".venv/bin/python benchmarks/bench_scale.py --scales {row}"),
    "benchmarks/results/eval-4bit-vs-bf16": Written(
        "benchmarks/bench_eval.py", "models", ".venv/bin/python benchmarks/bench_eval.py --reps 3 --examples 48"),
    "benchmarks/results/cpu-matmul-dtype": Written(
        "benchmarks/bench_matmul_dtype.py", "rows", ".venv/bin/python benchmarks/bench_matmul_dtype.py",
        lambda r: " x ".join(map(str, r["shape"])) + (", native bf16" if r["native_bf16"] else ", no native bf16")
        + (f" ({r['isa_cap'].upper()} cap)" if r.get("isa_cap") else "")),
    "benchmarks/results/compute-dtype": Written(
        "benchmarks/bench_compute_dtype.py", None, ".venv/bin/python benchmarks/bench_compute_dtype.py"),
    "benchmarks/results/export-cast": Written(
        "benchmarks/bench_export_cast.py", "rows", ".venv/bin/python benchmarks/bench_export_cast.py --steps 6 20"),
    "benchmarks/results/tune-workers": Written(
        "benchmarks/bench_tune_workers.py", "studies",
        ".venv/bin/python benchmarks/bench_tune_workers.py --workers 2 --trials 6", lambda r: r["study"]),
    "benchmarks/results/profile-step": Written(
        "benchmarks/profile_step.py", None, ".venv/bin/python benchmarks/profile_step.py --steps 3"),
    "benchmarks/results/repro": Written("benchmarks/repro.py", None, ".venv/bin/python benchmarks/repro.py"),
    "benchmarks/results/stage-times": Written(
        "benchmarks/bench_stages.py", "models", ".venv/bin/python benchmarks/bench_stages.py --models {row}",
        lambda r: r["model"]),
    "benchmarks/results/parallel": Written(
        "benchmarks/bench_parallel.py", None, ".venv/bin/python benchmarks/bench_parallel.py --steps 12 --unshared"),
    "benchmarks/results/gemma3-270m-writing-systems": Written(
        "benchmarks/bring_your_model.py", None, "`.venv/bin/python benchmarks/bring_your_model.py "
        "gemma3-270m-writing-systems RAW KEY=VALUE ...` with the data and edits its file records (docs/data.md)"),
    "benchmarks/results/debian-sizes": Written(
        "benchmarks/bring_your_model.py", None, "`.venv/bin/python benchmarks/debian_sizes.py RAW`, then "
        "`.venv/bin/python benchmarks/bring_your_model.py debian-sizes RAW KEY=VALUE ...` with the edits its file "
        "records (docs/data.md)"),
    "benchmarks/results/gpu-default-pipeline": Written(
        "benchmarks/gpu_results.py", None, "`bash benchmarks/gpu.sh ci`" + GPU),
    "benchmarks/results/gpu-train-vs-trl": Written(
        ["benchmarks/gpu.sh", "*benchmarks/bench_train.py"], "tools", "`bash benchmarks/gpu.sh default`" + GPU),
    "benchmarks/results/gpu-llama3-8b-vs-trl": Written(
        ["benchmarks/gpu.sh", "benchmarks/random_model.py", "*benchmarks/bench_train.py"], "tools",
        "`bash benchmarks/gpu.sh ci`" + GPU),
    "reports/noise": Written(NOISE_CODE, None, "make noise"),
}


def shared_lists():
    """The lists of benchmarks/stamp.py (UPSTREAM, TRAIN_STAGE, PIPELINE), from its source."""
    tree = ast.parse((ROOT / "benchmarks/stamp.py").read_text())
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.List)}


def declared(code):
    """The files a results file's figures depend on: its script's `CODE` (read from the source, `*NAME`
    the lists of benchmarks/stamp.py), or a list whose `*NAME` is such a list and `*path` a script's CODE."""
    shared = shared_lists()
    if isinstance(code, str):
        tree = ast.parse((ROOT / code).read_text())
        value = next((node.value for node in tree.body if isinstance(node, ast.Assign)
                      and [ast.unparse(t) for t in node.targets] == ["CODE"]), None)
        if not isinstance(value, ast.List):
            raise SystemExit(f"{code} declares no CODE = [...]: the files its figures depend on")
        code = [f"*{ast.unparse(e.value)}" if isinstance(e, ast.Starred) else ast.literal_eval(e) for e in value.elts]
    files = []
    for item in code:
        more = ([item] if not item.startswith("*") else shared[item[1:]] if item[1:] in shared
                else declared(item[1:]))
        files += [f for f in more if f not in files]
    return files


@cache  # one file's text is fingerprinted again for each row and commit that reads it
def fingerprint(path, text):
    """What of a file is behaviour: a Python module's syntax tree without its docstrings (comments are not
    in it), a YAML file's data, another file's lines without comments and blank lines. None: no such file."""
    if text is None:
        return None
    if path.endswith(".py"):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            return hashlib.sha1(text.encode()).hexdigest()
        for node in ast.walk(tree):
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
                    and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
                    and isinstance(node.body[0].value.value, str)):
                node.body = node.body[1:] or [ast.Pass()]
        kept = ast.dump(tree)
    elif path.endswith((".yaml", ".yml")):
        import yaml

        kept = json.dumps(yaml.safe_load(text), sort_keys=True, default=str)
    else:
        lines = (re.sub(r"\s+#\s.*$", "", line).rstrip() for line in text.splitlines()
                 if not line.lstrip().startswith("#"))
        kept = "\n".join(line for line in lines if line)
    return hashlib.sha1(kept.encode()).hexdigest()


def first_change(commit, path):
    """None where `path` is in the working tree what it was at `commit` (a full hash), comments and
    docstrings aside; else the first commit after it that changed that, or "" for the working tree."""
    key = ("change", str(ROOT), commit, path)
    if key not in CACHE:
        then = fingerprint(path, shown(commit, path))
        now = fingerprint(path, (ROOT / path).read_text() if (ROOT / path).exists() else None)
        CACHE[key] = None
        if then != now:
            later = git("rev-list", "--reverse", "--topo-order", f"{commit}..HEAD", "--", path).split()
            CACHE[key] = next((c for c in later if fingerprint(path, shown(c, path)) != then), "")
    return CACHE[key]


Stale = namedtuple("Stale", "file row commit date changed path more refresh")


def stale_rows(file):
    """The stale rows of a results file ("folder/stem"), as SOURCE has it; none for a file without
    an entry in RESULTS or not there."""
    key = ("stale", str(ROOT), SOURCE, file)
    if key in CACHE:
        return CACHE[key]
    CACHE[key] = []
    if file not in RESULTS:
        return []
    try:
        data = json.loads(text_of(f"{file}.json"))
    except FileNotFoundError:
        return []
    written = RESULTS[file]
    code = declared(written.code)
    order = {c: i for i, c in enumerate(git("rev-list", "--reverse", "--topo-order", "HEAD").split())}
    found = data[written.rows] if written.rows else {None: data}
    rows = found.items() if isinstance(found, dict) else ((written.label(r), r) for r in found)
    for name, record in rows:
        p = record.get("provenance") or {k: data.get(k) for k in ("commit", "date", "machine", "versions")}
        refresh = p.get("command") or written.refresh.format(row=name)
        commit = commit_of(str(p.get("commit") or ""))
        if commit is None:
            CACHE[key].append(Stale(file, name, str(p.get("commit")), p.get("date"), None, None, 0, refresh))
            continue
        changes = sorted((order.get(c, len(order)) if c else len(order), c, path) for path in code
                         if (c := first_change(commit, path)) is not None)
        if changes:
            _, changed, path = changes[0]
            CACHE[key].append(Stale(file, name, commit[:7], p.get("date"), changed[:7], path, len(changes) - 1,
                                    refresh))
    return CACHE[key]


def grouped(stale):
    """Stale rows with the same commit, first change and refresh command, together."""
    groups = {}
    for s in stale:
        groups.setdefault(s._replace(row=None), []).append(s)
    return list(groups.values())


def stale_note(rows):
    """One line for rows measured at the same commit: which, when, what changed since, how to refresh them."""
    s = rows[0]
    refresh = s.refresh if "`" in s.refresh else f"`{s.refresh}`"
    when = s.date or "date not recorded"
    which = ", ".join(f"`{r.row}`" for r in rows if r.row is not None)
    which = f"{which} measured" if which else "measured"
    if s.path is None:
        return f"stale: {which} at a commit not in this repository's history ({s.commit}); refresh: {refresh}"
    what = f"{s.changed} changed `{s.path}`" if s.changed else f"uncommitted edits to `{s.path}`"
    more = f" (and {s.more} more of the files it depends on)" if s.more else ""
    return f"stale: {which} at {s.commit} ({when}), before {what}{more}; refresh: {refresh}"


def pct(value, digits=1):
    return f"{100 * value:.{digits}f}%"


def times(value, digits=2):
    return f"{value:.{digits}f}x"


def environment():
    """The Jinja2 environment of inline figures: the result files by folder and stem, and filters."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters.update(pct=pct, times=times, thousands=lambda v: f"{v:,}")
    context = {name: {Path(path).stem: json.loads(text_of(path)) for path in listed(folder)}
               for name, folder in FOLDERS.items()}
    return env, context


def listed(folder):
    """The JSON files of a folder (not of its subfolders), relative to ROOT, from where SOURCE says."""
    if SOURCE:
        return sorted(path for path in git("ls-tree", "--name-only", SOURCE, f"{folder}/").splitlines()
                      if path.endswith(".json"))
    return [str(path.relative_to(ROOT)) for path in sorted((ROOT / folder).glob("*.json"))]


def render(text, where, env=None):
    """The text with every block and inline figure rendered afresh; stops naming the file and marker
    when a block has no function or an expression fails (a key missing from its file)."""
    import jinja2

    env, context = env or environment()

    def block(m):
        if m.group(2) not in BLOCKS:
            raise SystemExit(f"{where}: no block named {m.group(2)!r} (known: {', '.join(BLOCKS)})")
        READ.clear()
        try:
            content = BLOCKS[m.group(2)]()
        except FileNotFoundError as e:
            missing = "is not committed: commit it with the pages" if SOURCE else \
                "does not exist: run the script that writes it (benchmarks/README.md lists them)"
            raise SystemExit(f"{where}: block {m.group(2)!r} renders {Path(e.filename).relative_to(ROOT)}, which "
                             f"{missing}")
        notes = [stale_note(rows) for rows in grouped(s for f in sorted(READ) for s in stale_rows(f))]
        if notes and "\n" in content:  # a table or page: the notes under it
            content += "\n\n" + "\n".join(f"- {note}" for note in notes)
        elif notes:  # a sentence: the notes at its end
            content += " (" + "; ".join(notes) + ")"
        return m.group(1) + content + "\n" + m.group(4)

    def inline(m):
        try:
            value = env.from_string("{{ " + m.group(2) + " }}").render(context)
        except jinja2.TemplateError as e:
            raise SystemExit(f"{where}: cannot render <!-- = {m.group(2)} -->: {e}")
        read = {f"{FOLDERS[name]}/{stem}" for name, stem in
                re.findall(r"\b(results|reports)\s*(?:\.|\[\s*['\"])([\w-]+)", m.group(2))}
        if re.match(r"[-+]?[\d.]", value) and any(stale_rows(f) for f in read):  # a measured figure, not a name;
            # no commit in prose: --stale names it
            value += " (stale: `python -m tools.docs --stale`)"
        return m.group(1) + value + m.group(4)

    return INLINE.sub(inline, BLOCK.sub(block, text))


def files():
    return [path for pattern in FILES for path in sorted(ROOT.glob(pattern))]


def main(argv=None):
    global SOURCE
    parser = argparse.ArgumentParser(prog="python -m tools.docs", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that every figure is that of the files as committed (git HEAD)")
    parser.add_argument("--stale", action="store_true",
                        help="list every results row measured on code that has changed since, and its refresh command")
    args = parser.parse_args(argv)
    forget()  # the working tree, HEAD and the results may have changed since the last call
    SOURCE = None
    if args.check:
        SOURCE = commit_of("HEAD")
        if SOURCE is None:
            raise SystemExit(f"--check reads the result files as committed, and {ROOT} has no commit")
    if args.stale:
        for row in (s for f in RESULTS for s in stale_rows(f)):
            print(f"{row.file}.json: {stale_note([row])}")
        return 0
    env = environment()
    stale = []
    for path in files():
        text = path.read_text()
        rendered = render(text, path.relative_to(ROOT), env)
        if rendered == text:
            continue
        old, new = dict(marked(text)), dict(marked(rendered))
        stale += [f"{path.relative_to(ROOT)}: {name}" for name in new if old.get(name) != new[name]]
        if not args.check:
            path.write_text(rendered)
    if args.check and stale:
        print("out of date (make docs rewrites them from their files):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


def marked(text):
    """(marker, what it shows) for every block and inline figure of a text, in order."""
    found = [(m.group(2), m.group(3)) for m in BLOCK.finditer(text)]
    return found + [(f"<!-- = {m.group(2)} -->", m.group(3)) for m in INLINE.finditer(text)]


if __name__ == "__main__":
    sys.exit(main())

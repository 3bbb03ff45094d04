"""Offline plots and the experiment comparison report; no stage, run on demand.

    python -m tools.report exps [REV ...]    # the experiments as a table on the console, best first
    python -m tools.report plots [REV ...]   # dvc plots show/diff, rendered offline
    python -m tools.report compare [REV ...] # one page: experiments, changed params, metrics, curves
    python -m tools.report noise --seeds N   # the seed noise floor: reports/noise.{md,json}

`dvc plots show` writes HTML whose charting scripts load from a CDN, so the page is
blank offline. `plots` hands DVC an HTML template with the chart library (vega,
vega-lite, vega-embed, from the `vl-convert-python` wheel) inlined, so the page
works with no network. `compare` reads `dvc exp show --json` and `dvc plots diff
--json` (DVC overlays the curves) and writes reports/compare.md (with PNG charts),
reports/compare.html (self-contained, SVG charts) and reports/compare.json (the tables).
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from qlora.tasks import TASKS, task_of

REPORTS = Path("reports")
# The metrics a comparison shows, most telling first: (file, key, column title). The console table keeps
# as many as the terminal is wide. Best run: lowest val loss. metrics/scores.json is what `dvc exp show`
# lists; the stages' other figures are plain outputs in git beside it (DETAILS), read at each run's commit.
EVALUATE = "metrics/evaluate.json"
# What decides between runs, shown before the params that differ and kept at any width: the val loss, each
# task's primary metric on test (a run has its own task's) with its gain over the base model, answered.
DECIDING = [
    (EVALUATE, "val_loss", "val loss"),
    *[(EVALUATE, f"test_{t.primary}", t.titles[t.primary]) for t in TASKS.values()],
    *[(EVALUATE, f"{t.primary}_gain", f"{t.titles[t.primary].removeprefix('test ')} vs base") for t in TASKS.values()],
    (EVALUATE, "test_answered", "answered"),
]
KEY_METRICS = [
    *DECIDING,
    (EVALUATE, "overfitting", "overfitting"),
    (EVALUATE, "best_val_step", "best step"),
    ("metrics/train.json", "tokens_per_second", "tokens/s"),
    ("metrics/train.json", "peak_memory_mb", "peak MB"),
    (EVALUATE, "test_loss", "test loss"),
    *[(EVALUATE, f"test_{m}", t.titles[m]) for t in TASKS.values() for m in t.metrics if m not in (t.primary, "answered")],
    (EVALUATE, "gap", "gap"),
    (EVALUATE, "best_val_loss", "best val"),
    (EVALUATE, "val_loss_rise_pct", "rise %"),
    ("metrics/train.json", "steps", "steps"),
    ("metrics/train.json", "stopped_early", "stopped early"),
    ("metrics/train.json", "mfu", "MFU"),
]
DETAILS = (EVALUATE, "metrics/train.json")
BEST_BY = (EVALUATE, "val_loss")  # held-out, never the test split
PREDICTIONS = "metrics/predictions.json"  # per test example: both answers, scores, loss; what pairs two runs
CURVES = ("Loss (train and val)", "Learning rate")


def dvc(*args):
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{result.stderr.strip()}")
    return result.stdout


def offline_template():
    """DVC's HTML page with the chart library inlined instead of loaded from a CDN; charts render as SVG."""
    import vl_convert

    return f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{{refresh_tag}}
<title>QLoRA experiment plots</title>
<script>{vl_convert.javascript_bundle()}</script>
<script>
  const embedWithCanvas = window.vegaEmbed;  // DVC calls vegaEmbed(el, spec): render SVG, readable offline and by tests
  window.vegaEmbed = (el, spec, options) => embedWithCanvas(el, spec, {{renderer: "svg", actions: false, ...options}});
</script>
<style>body {{ font-family: sans-serif; }} table {{ border-spacing: 15px; }}</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def plots(revs, out):
    """`dvc plots show` (no revs) or `dvc plots diff REVS`, written to OUT/index.html, viewable offline."""
    Path(out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "template.html"
        template.write_text(offline_template())
        command = ["plots", "diff", *revs] if revs else ["plots", "show"]
        dvc(*command, "--html-template", str(template), "-o", str(out))
    return Path(out) / "index.html"


def flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def committed(rev, path):
    """A file as git has it at `rev` (a commit or an experiment's), or None."""
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else None


def text_at(rev, path):
    """A file of a run: from disk for the workspace, else as git has it at the run's commit; None if absent."""
    if rev == "workspace":
        return Path(path).read_text() if Path(path).exists() else None
    return committed(rev, path)


def details(rev, scored):
    """Every figure of a run by file (DETAILS): from the workspace, or from git at the run's commit. None for
    a run that has not finished (queued, running, failed: its commit holds its baseline's files)."""
    if not scored:
        return {}
    found = {}
    for path in DETAILS:
        text = text_at(rev, path)
        if text:
            found[path] = json.loads(text)
    return found


def test_set_of(rev):
    """A short name for the test examples a run was scored on (its predictions), or None: runs are
    compared, and one named best, only on the same test set."""
    import hashlib

    text = text_at(rev, PREDICTIONS)
    if not text:
        return None
    pairs = [(r["input"], r["expected"]) for r in json.loads(text)]
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:8]


def baselines(revs):
    """The commits `dvc exp show` is asked for: `revs`, or this commit by its hash. DVC reads the name HEAD
    as refs/exps/exec/EXEC_BASELINE while that ref exists (a `dvc exp run` in the workspace, or one killed
    before it removed the ref), and would list that older commit's runs as this one's."""
    if revs:
        return list(revs)
    def rev(name):
        return subprocess.run(["git", "rev-parse", "-q", "--verify", name], capture_output=True, text=True).stdout.strip()
    head, left = rev("HEAD"), rev("refs/exps/exec/EXEC_BASELINE")
    if left and left != head:
        print(f"note: refs/exps/exec/EXEC_BASELINE ({left[:7]}) is left by a dvc exp run that is running or was "
              f"interrupted, so DVC reads HEAD as {left[:7]}; this table shows HEAD ({head[:7]}). If no dvc exp run "
              f"is running, `git update-ref -d refs/exps/exec/EXEC_BASELINE` ends the mix-up.", file=sys.stderr)
    return [head] if head else []


def experiment_rows(revs=None, names=None, workspace=False):
    """One row per experiment (and its baseline commit): name, rev, flat params, metrics by file (the
    scores `dvc exp show` lists and the stages' other figures, DETAILS), and the test set it was scored on.
    With `names`, only those runs (an experiment's or a commit's name); with `workspace`, the workspace too
    when its params or metrics are those of no other row (a `dvc repro` not yet committed)."""
    rows = []
    asked = baselines(revs)
    for baseline in json.loads(dvc("exp", "show", "--json", *(["--rev", *asked] if asked else []))):
        if baseline["rev"] == "workspace" and not (workspace and not revs):
            continue
        entries = [(baseline["name"] or baseline["rev"][:7], baseline, True)]
        for exp in baseline.get("experiments") or []:
            entries += [(exp.get("name") or r["rev"][:7], r, False) for r in exp["revs"][:1]]
        for name, entry, is_commit in entries:
            data = entry.get("data") or {}
            params = flatten((data.get("params") or {}).get("params.yaml", {}).get("data", {}))
            metrics = {f: (m or {}).get("data", {}) for f, m in (data.get("metrics") or {}).items()}
            scored = any(metrics.values())
            metrics.update(details(entry["rev"], scored))
            rows.append(dict(name=name, rev=entry["rev"], params=params, metrics=metrics, commit=is_commit,
                             status=data.get("status") or "Success",
                             test_set=test_set_of(entry["rev"]) if scored else None))
    if rows and rows[0]["rev"] == "workspace":
        if any((rows[0]["params"], rows[0]["metrics"]) == (r["params"], r["metrics"]) for r in rows[1:]):
            rows.pop(0)  # the workspace is its commit, or the experiment just run: one row is enough
        else:
            rows[0]["name"] = "workspace"
    if names:
        missing = set(names) - {r["name"] for r in rows}
        if missing:
            raise SystemExit(f"no experiment or commit named {', '.join(sorted(missing))} here "
                             f"(runs: {', '.join(r['name'] for r in rows)}; dvc exp show lists them)")
        rows = [r for r in rows if r["name"] in names]
    return rows


def changed_params(rows):
    keys = sorted({k for r in rows for k in r["params"]})
    return [k for k in keys if len({json.dumps(r["params"].get(k)) for r in rows}) > 1]


def val_of(row):
    value = row["metrics"].get(BEST_BY[0], {}).get(BEST_BY[1])
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def test_sets(rows):
    """The runs grouped by the test set they were scored on, the largest group first."""
    groups = {}
    for r in rows:
        if r["test_set"] and val_of(r) is not None:
            groups.setdefault(r["test_set"], []).append(r)
    return sorted(groups.values(), key=len, reverse=True)


def best_rows(rows):
    """The best run (lowest val loss) of each test set that two or more runs share: only runs scored on the
    same data and test examples are ranked against each other."""
    return [min(group, key=val_of) for group in test_sets(rows) if len(group) > 1]


def best_row(rows):
    """The best run of the largest test set two or more runs share, or None."""
    best = best_rows(rows)
    return best[0] if best else None


def cell(value, width=28, digits=4):
    """A value as one short line: floats to `digits` significant digits, a multi-line param (a prompt
    template) on one line, cut at `width` characters."""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    text = "" if value is None else str(value) if not isinstance(value, (list, dict)) else json.dumps(value)
    text = text.replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


def digits_for(values, least=4, most=8):
    """The fewest significant digits (at least `least`) that keep apart every two different values of a
    column, so that the order a table is sorted by shows in it."""
    values = {v for v in values if isinstance(v, float) and math.isfinite(v)}
    for digits in range(least, most):
        if len({f"{v:.{digits}g}" for v in values}) == len(values):
            return digits
    return most


def with_interval(metrics, key, digits=4):
    """A metric as `value ±half-width` of its 95% interval (`<key>_ci_low/high`) when it has one."""
    value = metrics.get(key)
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if isinstance(value, (int, float)) and isinstance(low, (int, float)) and isinstance(high, (int, float)):
        return f"{cell(value, digits=digits)} ±{(high - low) / 2:.2g}"
    return cell(value, digits=digits)


def test_set_names(rows):
    """A letter per test set (A, B, ...) in the order the rows meet them, when there are several."""
    seen = list(dict.fromkeys(r["test_set"] for r in rows if r["test_set"]))
    return {t: chr(ord("A") + i) for i, t in enumerate(seen)} if len(seen) > 1 else {}


def table(rows, changed, best, param_width=28):
    """(head, body) of the runs, and how many columns come before the changed params: experiment (★ the
    best of its test set), the test set when there are several, the DECIDING metrics, the changed params,
    then the other KEY_METRICS; a metric no run has is left out, and each column has the digits that tell
    its values apart."""
    best = best if isinstance(best, list) else [best] if best else []
    shown = [(f, k, title) for f, k, title in KEY_METRICS  # the task's metrics: a column no run has is left out
             if any(k in r["metrics"].get(f, {}) for r in rows)]
    deciding = [m for m in shown if m in DECIDING]
    others = [m for m in shown if m not in DECIDING]
    sets = test_set_names(rows)

    def metric_column(f, k):
        digits = digits_for([r["metrics"].get(f, {}).get(k) for r in rows])
        return [with_interval(r["metrics"].get(f, {}), k, digits) for r in rows]

    head = ["experiment", *(["test set"] if sets else []), *(title for _, _, title in deciding), *changed,
            *(title for _, _, title in others)]
    columns = [[("★ " if any(r is b for b in best) else "") + r["name"] for r in rows]]
    if sets:
        columns.append([sets.get(r["test_set"], "") for r in rows])
    columns += [metric_column(f, k) for f, k, _ in deciding]
    columns += [[cell(r["params"].get(k), param_width) for r in rows] for k in changed]
    columns += [metric_column(f, k) for f, k, _ in others]
    return head, [list(row) for row in zip(*columns)], 1 + bool(sets) + len(deciding)


def by_val_loss(rows):
    """Lowest val loss first; runs without one (failed, queued) last."""
    return sorted(rows, key=lambda r: (val_of(r) is None, val_of(r) or 0))


def text_table(head, body):
    """Columns two spaces apart, numbers right-aligned."""
    widths = [max(len(x) for x in column) for column in zip(head, *body)]
    numeric = [all(c[:1].isdigit() or c[:1] == "-" or not c for c in column) for column in zip(*body)] \
        if body else [False] * len(head)
    line = lambda row: "  ".join(c.rjust(w) if n else c.ljust(w)  # noqa: E731
                                 for c, w, n in zip(row, widths, numeric)).rstrip()
    return "\n".join([line(head), *(line(row) for row in body)])


def fitted(head, body, width, keep):
    """The table without its last columns, one by one, until it fits `width` characters (the first `keep`
    columns stay); and the titles of the columns left out."""
    dropped = []
    while len(head) > keep and max(len(x) for x in text_table(head, body).splitlines()) > width:
        dropped.insert(0, head[-1])
        head, body = head[:-1], [row[:-1] for row in body]
    return head, body, dropped


def exps(revs=None, names=None, width=None):
    """The experiments of the current commit (or of REVS) as a console table, lowest val loss first:
    the params that differ between them and the key metrics, each test metric ± the half-width of its
    95% interval, as many as fit the terminal. ★ marks the best run of each test set that several share."""
    import shutil

    rows = by_val_loss(experiment_rows(revs, names, workspace=True))
    if not rows:
        raise SystemExit("exps: no experiments found; run `dvc exp run` first")
    width = max(80, width or shutil.get_terminal_size((200, 24)).columns)
    changed = changed_params(rows)
    head, body, keep = table(rows, changed, best_rows(rows))  # keep: the name, the test set, what decides
    if max(len(x) for x in text_table(head, body).splitlines()) > width:
        head, body, keep = table(rows, changed, best_rows(rows), param_width=16)
    head, body, dropped = fitted(head, body, width, keep)
    import textwrap

    notes = []
    if test_set_names(rows):
        notes.append("Runs on different test sets (data.* or the data changed): ★ marks the best of each set "
                     "two or more runs share; only runs on one set are ranked against each other.")
    if dropped:
        notes.append(f"Left out at {width} columns: {', '.join(dropped)} (a wider terminal, or make compare).")
    return "\n".join([text_table(head, body), *(textwrap.fill(note, width) for note in notes)])


def markdown_table(head, body):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in body]
    return "\n".join(lines)


def html_table(head, body):
    from html import escape

    cells = lambda row, tag: "".join(f"<{tag}>{escape(c)}</{tag}>" for c in row)  # noqa: E731
    return ("<table><thead><tr>" + cells(head, "th") + "</tr></thead><tbody>"
            + "".join(f"<tr>{cells(row, 'td')}</tr>" for row in body) + "</tbody></table>")


def curve_specs(rows):
    """DVC's own overlay of the curves across the experiments, as vega-lite specs with their data."""
    revs = [r["name"] for r in rows if r["status"] == "Success"]  # experiment and branch names are revisions
    found = json.loads(dvc("plots", "diff", *revs, "--json")).get("data", {})
    specs = {}
    for title in CURVES:
        for plot in found.get(title, []):
            specs[title] = dict(plot["content"], width=520, height=300)
    return specs


SCATTER = "Truth vs prediction (test)"


def scatter_spec(rows):
    """Each run's test answers against their references, and the base model's once per test set, as a
    vega-lite spec (log axes when every value is above 0 and they span two decades or more); None when no
    run's answers are numbers (the task says: qlora.tasks.Task.scatter)."""
    values, bases = [], set()
    for r in rows:
        preds = predictions_at(r["rev"]) if r["status"] == "Success" and r["rev"] != "workspace" else None
        task = task_of(preds, None) if preds else None
        points = task.scatter(preds) if task else []
        if not points:
            continue
        values += [dict(p, run=r["name"]) for p in points]
        if r["test_set"] not in bases:
            bases.add(r["test_set"])
            base = "base model" + (f" (test set {test_set_names(rows)[r['test_set']]})" if test_set_names(rows) else "")
            values += [dict(p, run=base) for p in task.scatter(preds, "base_")]
    if not values:
        return None
    low, high = (f(v[k] for v in values for k in ("reference", "prediction")) for f in (min, max))
    scale = {"type": "log"} if low > 0 and high >= 100 * low else {"zero": False}
    axis = lambda field: dict(field=field, type="quantitative", scale=scale)  # noqa: E731
    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "width": 520, "height": 400,
            "layer": [
                {"data": {"values": values}, "mark": {"type": "point", "filled": True, "opacity": 0.6},
                 "encoding": {"x": axis("reference"), "y": axis("prediction"),
                              "color": {"field": "run", "type": "nominal"}}},
                {"data": {"values": [dict(reference=low, prediction=low), dict(reference=high, prediction=high)]},
                 "mark": {"type": "line", "color": "gray", "strokeDash": [4, 4]},  # prediction = truth
                 "encoding": {"x": axis("reference"), "y": axis("prediction")}}]}


def predictions_at(rev):
    """The per-example test predictions a run committed, or None (a failed or older run)."""
    result = subprocess.run(["git", "show", f"{rev}:{PREDICTIONS}"], capture_output=True, text=True)
    return json.loads(result.stdout) if result.returncode == 0 else None


def same_test_set(a, b):
    """Whether two runs were scored on the same test examples in the same order: only then can their
    scores be paired. A changed data.* (split, seed, labels, file) gives another test set."""
    return [(r["input"], r["expected"]) for r in a] == [(r["input"], r["expected"]) for r in b]


def unpaired_reason(ref_preds, preds):
    """Why two runs' test predictions cannot be paired, or None when they can."""
    if not preds or not ref_preds or "loss_sum" not in preds[0] or "loss_sum" not in ref_preds[0]:
        return "no per-example predictions"
    if not same_test_set(ref_preds, preds):
        return "not comparable: another test set (data.* changed)"
    return None


def paired_comparison(ref, rows, floor=None):
    """Each test metric of a run (`rows`, predictions.json) against a reference run on the same
    examples: (metric, run's value, reference's value, difference, its paired 95% bootstrap interval,
    verdict). Better or worse when the interval excludes 0, within noise otherwise, and within noise
    too when the difference is smaller than `floor[metric]`, the spread across seeds (make noise)."""
    floor = floor or {}
    import numpy as np

    from qlora.scoring import interval, metric_samples, resampled

    task = task_of(rows)
    references = [r["expected"] for r in rows]

    def samples(preds, idx):
        return metric_samples(task, preds, references, [r["loss_sum"] for r in preds], [r["tokens"] for r in preds],
                              idx)

    whole = np.arange(len(rows))[None, :]
    mine, theirs = samples(rows, whole), samples(ref, whole)
    idx = resampled(len(rows))
    mine_resampled, theirs_resampled = samples(rows, idx), samples(ref, idx)
    out = []
    for name in mine:
        if name not in theirs or not np.isfinite([mine[name][0], theirs[name][0]]).all():
            continue  # undefined for one of the runs (a correlation of constant answers, RMSLE below 0)
        diff = round(float(mine[name][0] - theirs[name][0]), 4)
        low, high = interval(mine_resampled[name] - theirs_resampled[name])
        if low is None:
            continue
        sign = task.better(name)
        verdict = "within noise" if low <= 0 <= high else \
            "within noise (seed spread)" if abs(diff) < floor.get(name, 0) else "better" if sign * diff > 0 else "worse"
        out.append((name, round(float(mine[name][0]), 4), round(float(theirs[name][0]), 4), diff, low, high, verdict))
    return out


def comparisons(rows, ref_name):
    """Every run against the reference run: the paired rows of the report, and a sentence per run."""
    ref = next((r for r in rows if r["name"] == ref_name), None)
    if ref is None:
        raise SystemExit(f"compare: no run named {ref_name!r} (runs: {', '.join(r['name'] for r in rows)})")
    ref_preds = predictions_at(ref["rev"])
    floor, _ = noise_floor(ref["test_set"])
    head = ["experiment", "metric", "value", f"{ref_name}", "difference", "95% interval", "verdict"]
    body = []
    for row in rows:
        if row is ref:
            continue
        preds = predictions_at(row["rev"])
        reason = unpaired_reason(ref_preds, preds)
        if reason:
            body.append([row["name"], "", "", "", "", "", reason])
        else:
            body += [[row["name"], name, str(value), str(base), f"{diff:+}", f"[{low}, {high}]", verdict]
                     for name, value, base, diff, low, high, verdict in paired_comparison(ref_preds, preds, floor)]
    return head, body


def versus_runner_up(rows, best):
    """A sentence: whether the best run (by val loss) is told apart from the runner-up on test, paired."""
    group = next((g for g in test_sets(rows) if best is not None and any(r is best for r in g)), [])
    scored = sorted(group, key=val_of)
    if best is None or len(scored) < 2:
        return ""
    runner_up = scored[1]
    mine, theirs = predictions_at(best["rev"]), predictions_at(runner_up["rev"])
    reason = unpaired_reason(theirs, mine)
    if reason:
        return f" The runner-up, {runner_up['name']}, cannot be paired with it ({reason})."
    told = [f"{name} {verdict} ({diff:+}, [{low}, {high}])" for name, _, _, diff, low, high, verdict
            in paired_comparison(theirs, mine, noise_floor(best["test_set"])[0]) if not verdict.startswith("within noise")]
    if not told:
        return (f" Against the runner-up, {runner_up['name']}, every test difference is within noise: "
                "the two are not told apart on this test set.")
    return f" Against the runner-up, {runner_up['name']}, on test: " + "; ".join(told) + "."


NOISE = "noise"  # experiments named noise-seed-<n>, and reports/noise.{md,json}
NOISE_METRICS = ("val_loss", "test_loss", *dict.fromkeys(f"test_{m}" for t in TASKS.values() for m in t.metrics))


def wait_for_queue(timeout=24 * 3600):
    import re
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = dvc("queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        time.sleep(10)
    raise SystemExit("noise: the queue did not finish in time")


def data_version():
    """The raw data and the prepared splits the workspace's runs read, by DVC's content hash (dvc.lock)."""
    from qlora.outputs import prepare_hashes

    return {path: md5 for path, md5 in prepare_hashes().items() if not path.endswith(".py")}


def noise(seeds, out, data_seeds=False):
    """Run the current params with train.seed = 1..seeds (and data.seed too with `data_seeds`), one
    experiment each, and write the spread of each metric across them: reports/noise.{md,json}. A
    difference between two experiments smaller than this spread is what the seed alone can do."""
    names = {exp["name"] for base in json.loads(dvc("exp", "show", "--json")) for exp in base.get("experiments") or []}
    queued = []
    for seed in range(1, seeds + 1):
        name = f"{NOISE}-seed-{seed}"
        if name in names:
            continue  # already run on this commit: reused
        sets = ["-S", f"train.seed={seed}"] + (["-S", f"data.seed={seed}"] if data_seeds else [])
        dvc("exp", "run", "--queue", "-n", name, *sets)
        queued.append(name)
    if queued:
        dvc("queue", "start", "-j", "1")  # one at a time: on a CPU, parallel runs share the cores
        status = wait_for_queue()
        if "Failed" in status:
            raise SystemExit(f"noise: a seed run failed:\n{status}")
    rows = [r for r in experiment_rows() if r["name"].startswith(f"{NOISE}-seed-")]
    values = {}
    for key in NOISE_METRICS:
        found = [r["metrics"].get("metrics/evaluate.json", {}).get(key) for r in rows]
        if found and all(isinstance(v, (int, float)) for v in found):
            values[key] = found
    import statistics

    summary = {key: dict(values=v, mean=round(statistics.mean(v), 4), std=round(statistics.stdev(v), 4),
                         min=min(v), max=max(v), spread=round(max(v) - min(v), 4))
               for key, v in values.items() if len(v) > 1}
    from qlora.outputs import provenance

    sets = {r["test_set"] for r in rows}  # one, unless data.seed moved with the seed: then no set is recorded
    result = dict(seeds=seeds, data_seeds=data_seeds, experiments=[r["name"] for r in rows],
                  test_set=sets.pop() if len(sets) == 1 else None, data=data_version(), metrics=summary,
                  **provenance())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NOISE}.json").write_text(json.dumps(result, indent=2) + "\n")
    head = ["metric", "mean", "std", "min", "max", "spread (max - min)"]
    body = [[k, str(m["mean"]), str(m["std"]), str(m["min"]), str(m["max"]), str(m["spread"])]
            for k, m in summary.items()]
    (out / f"{NOISE}.md").write_text("\n".join([
        "# Seed noise floor", "",
        f"The same params run with train.seed = 1..{seeds}" + (" and data.seed the same" if data_seeds else "")
        + ": how far a metric moves when only the seed changes. A difference between experiments smaller "
          "than the spread is within noise.", "", markdown_table(head, body), ""]))
    return out / f"{NOISE}.md"


def noise_floor(test_set, folder=REPORTS):
    """The spread of each metric across seeds (reports/noise.json), by the name paired_comparison uses, when
    it was measured on `test_set` (the same data, split and test examples); and a sentence saying whether
    it applies. A floor measured on other data says nothing of these runs: then none applies."""
    path = Path(folder) / f"{NOISE}.json"
    if not path.exists():
        return {}, "No seed noise floor is applied (none measured: make noise)."
    noise = json.loads(path.read_text())
    if test_set is None or noise.get("test_set") != test_set:
        return {}, (f"No seed noise floor is applied: {path} was measured on "
                    + ("a test set it does not record" if not noise.get("test_set") else "another test set")
                    + ", not these runs' (make noise on this data measures theirs).")
    floor = {key.removeprefix("test_"): m["spread"] for key, m in noise["metrics"].items() if key != "val_loss"}
    return floor, (f"Differences within the seed spread of {path} ({noise['seeds']} seeds, measured on this test set) "
                   "are within noise.")


def reference(rows, ref_name=None):
    """The run every other is compared with, and why it: `ref_name` if given; else the commit the
    experiments were run from when another run shares its test set; else the best run of the largest
    test set that several runs share."""
    if ref_name:
        ref = next((r for r in rows if r["name"] == ref_name), None)
        if ref is None:
            raise SystemExit(f"compare: no run named {ref_name!r} (runs: {', '.join(r['name'] for r in rows)})")
        return ref, "as asked (--ref)"
    commit = next((r for r in rows if r["commit"]), None)
    if commit and any(r is not commit and r["test_set"] and r["test_set"] == commit["test_set"] for r in rows):
        return commit, "the commit the experiments were run from"
    best = best_row(rows)
    if best is None:
        return rows[0], "the first run; no two runs share a test set"
    return best, "the best run by val loss of the runs that share its test set" + (
        f" ({commit['name']}, the commit, was scored on another one)" if commit else "")


def compare(revs, out, ref_name=None, names=None):
    import vl_convert

    rows = by_val_loss(experiment_rows(revs, names))
    if not rows:
        raise SystemExit("compare: no experiments found; run `dvc exp run` first")
    changed = changed_params(rows)
    bests = best_rows(rows)
    best = bests[0] if bests else None
    head, body, _ = table(rows, changed, bests)
    specs = {**curve_specs(rows), **({SCATTER: scatter} if (scatter := scatter_spec(rows)) else {})}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    several = len(test_sets(rows)) > 1
    named = "; ".join(f"{b['name']} (lowest {BEST_BY[1]} = {val_of(b)}" + (f", test set {test_set_names(rows)[b['test_set']]})"
                                                                         if several else ")") for b in bests)
    summary = (f"{len(rows)} runs, best first. Changed params: {', '.join(changed) or 'none'}. "
               + (f"★ best: {named}, by the held-out split; test is reported, never used to choose."
                  + (" Runs on different test sets are ranked only within their own." if several else "")
                  if bests else "No two runs with metrics share a test set: none is named best.")
               + versus_runner_up(rows, best))
    ref, why = reference(rows, ref_name)
    ref_name = ref["name"]
    pair_head, pair_body = comparisons(rows, ref_name)
    summary += f" Reference for the paired comparison: {ref_name}, {why}. " + noise_floor(ref["test_set"])[1]
    paired = (f"Each run against {ref_name} on the same test examples: the difference of each test metric, "
              "its paired 95% bootstrap interval (2,000 resamples of the examples, both runs scored on the same "
              "ones), and a verdict: better or worse when the interval excludes 0, within noise otherwise.")
    md = ["# Experiment comparison", "", summary, "", markdown_table(head, body), "",
          f"## Against {ref_name}", "", paired, "", markdown_table(pair_head, pair_body), ""]
    html = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Experiment comparison</title>",
            "<style>body{font-family:sans-serif} td,th{padding:2px 8px;text-align:right} "
            "th{border-bottom:1px solid #999}</style></head><body>",
            "<h1>Experiment comparison</h1>", f"<p>{summary}</p>", html_table(head, body),
            f"<h2>Against {ref_name}</h2>", f"<p>{paired}</p>", html_table(pair_head, pair_body)]
    for title, spec in specs.items():
        image = out / f"compare-{title.split()[0].lower()}.png"
        image.write_bytes(vl_convert.vegalite_to_png(spec, scale=2))
        md += [f"## {title}", "", f"![{title}]({image.name})", ""]
        html += [f"<h2>{title}</h2>", vl_convert.vegalite_to_svg(spec)]
    html.append("</body></html>")
    from qlora.outputs import provenance

    against = [dict(zip(["experiment", "metric", "value", "reference", "difference", "interval", "verdict"], row))
               for row in pair_body]
    (out / "compare.json").write_text(json.dumps(dict(
        summary=summary, ref=ref_name, changed=changed, runs=[dict(zip(head, row)) for row in body],
        against=against, **provenance()), indent=2, ensure_ascii=False) + "\n")
    (out / "compare.md").write_text("\n".join(md))
    (out / "compare.html").write_text("\n".join(html))
    return out / "compare.html"


def screenshot(page, png, size="1280x1600"):
    """A PNG of a page as headless Chromium renders it with no network (the docs' pictures of it)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("--screenshot: chromium is not installed (apt-get install chromium)")
    png = Path(png).resolve()
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}",
             f"--window-size={size.replace('x', ',')}", "--virtual-time-budget=15000", f"--screenshot={png}",
             Path(page).resolve().as_uri()], capture_output=True, text=True, timeout=180)
    if result.returncode != 0 or not png.exists():
        raise SystemExit(f"--screenshot: chromium failed:\n{result.stderr[-2000:]}")
    return png


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["exps", "plots", "compare", "noise"])
    parser.add_argument("--seeds", type=int, default=3, help="noise: train.seed = 1..SEEDS")
    parser.add_argument("--data-seeds", action="store_true", help="noise: set data.seed to the same seed too")
    parser.add_argument("revs", nargs="*", help="plots: revisions or experiment names to overlay; "
                                                "exps, compare: baseline commits whose experiments to show")
    parser.add_argument("-o", "--out", default=None, help="output folder (default reports/plots or reports)")
    parser.add_argument("--exps", nargs="+", default=None, metavar="NAME",
                        help="exps, compare: only these runs (experiments, or a commit such as main: name it to keep it)")
    parser.add_argument("--screenshot", default=None, metavar="PNG",
                        help="plots, compare: also a picture of the page, from headless Chromium")
    parser.add_argument("--size", default="1280x1600", help="--screenshot: the window, WIDTHxHEIGHT")
    parser.add_argument("--ref", default=None, help="compare: the run every other is compared with, paired "
                                                    "(default: the baseline commit when runs share its test "
                                                    "set, else the best run of the largest shared test set)")
    args = parser.parse_args(argv)
    if args.command == "exps":
        print(exps(args.revs, args.exps))
        return 0
    if args.command == "plots":
        page = plots(args.revs, args.out or REPORTS / "plots")
    elif args.command == "noise":
        page = noise(args.seeds, args.out or REPORTS, args.data_seeds)
    else:
        page = compare(args.revs, args.out or REPORTS, args.ref, args.exps)
    print(page)
    if args.screenshot and args.command in ("plots", "compare"):
        print(screenshot(page, args.screenshot, args.size))


if __name__ == "__main__":
    sys.exit(main())

"""Comparing experiments: a queued sweep, the comparison report, and plots that render offline
in headless Chromium. Real DVC in a temporary git repo, tiny model."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import copy_project, run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def exp_rows(project, baseline_commits=False):
    """{name: (params.yaml data, scores.json data)} for every experiment in `dvc exp show`,
    and for the commits they are based on when `baseline_commits`."""
    rows = {}

    def add(name, data):
        rows[name] = (data["params"]["params.yaml"]["data"],
                      (data["metrics"] or {}).get("metrics/scores.json", {}).get("data"))

    for baseline in json.loads(run(["dvc", "exp", "show", "--json"], project).stdout):
        if baseline_commits and baseline["rev"] != "workspace":
            add(baseline["name"] or baseline["rev"][:7], baseline["data"])
        for exp in baseline.get("experiments") or []:
            add(exp["name"], exp["revs"][0]["data"])
    return rows


# The grid every test below reads: lora.r on the project's split and on another (data.seed), each point
# renamed for what it is.
GRID = {(2, 42): "small", (16, 42): "large", (2, 7): "other-split", (16, 7): "other-split-r16"}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, reproduced_project):
    """The reproduced project with GRID queued in one command and run on two workers."""
    p = copy_project(reproduced_project[0], tmp_path_factory.mktemp("swept") / "project")
    run(["dvc", "exp", "run", "--queue", "-S", "lora.r=2,16", "-S", "data.seed=42,7"], p)
    assert "Started '2' new experiments task queue worker" in run(["dvc", "queue", "start", "-j", "2"], p).stdout
    deadline = time.time() + 900
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], p).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(5)
    assert "Failed" not in status, status
    for name, (params, _) in exp_rows(p).items():
        run(["dvc", "exp", "rename", name, GRID[params["lora"]["r"], params["data"]["seed"]]], p)
    return p


def test_queued_grid_on_two_workers_runs_every_point_with_its_own_metrics(swept):
    p = swept
    rows = exp_rows(p)
    assert {name: (params["lora"]["r"], params["data"]["seed"]) for name, (params, _) in rows.items()} == \
        {name: point for point, name in GRID.items()}
    assert all(m and "val_loss" in m and "accuracy" in m for _, m in rows.values())
    # What `dvc exp show` lists: only scores.json, a dozen leaves, each the figure of the file it comes from.
    shown = json.loads(run(["dvc", "exp", "show", "--json"], p).stdout)
    files = {f for b in shown for e in b.get("experiments") or [] for f in e["revs"][0]["data"]["metrics"]}
    assert files == {"metrics/scores.json", "metrics/exported.json"}
    from stages.evaluate import COST, SCORES

    sources = {k.format(primary="accuracy"): v.format(primary="accuracy") for k, v in {**SCORES, **COST}.items()}
    # An MFU is null where the run beat even a peak measured again (a peak measured on a busy machine:
    # qlora/cost.py), and `dvc exp show` leaves a null out. Every other key is always shown.
    assert all(set(sources) - set(m) <= {"mfu"} and set(m) <= set(sources) for _, m in rows.values())
    one = next(e["revs"][0] for b in shown for e in b.get("experiments") or [])
    figures = {}
    for file in ("metrics/train.json", "metrics/evaluate.json"):
        figures.update(json.loads(run(["git", "show", f"{one['rev']}:{file}"], p).stdout))
    assert one["data"]["metrics"]["metrics/scores.json"]["data"] == \
        {k: figures[v] for k, v in sources.items() if figures[v] is not None}
    assert len({m["val_loss"] for _, m in rows.values()}) == len(GRID), "each grid point has its own result"


def chromium_dom(page, tmp_path):
    """The page's DOM after its scripts ran, in headless Chromium with no network."""
    if not CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=15000", "--dump-dom",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def table_lines(console):
    """The lines of a `make exps` table, without the notes under it."""
    return [line for line in console[:next((i for i, line in enumerate(console)
                                           if line.startswith(("Left out at ", "Runs on different"))), None)]]


def test_compare_report_and_offline_plots(swept, tmp_path):
    p = swept
    python = [sys.executable, "-m", "tools.report"]
    # First the runs on the project's split, with their baseline commit.
    rows = exp_rows(p, baseline_commits=True)
    baseline = next(name for name in rows if name not in GRID.values())
    rows = {name: rows[name] for name in ("small", "large", baseline)}
    same_split = ["--exps", *rows]

    run([*python, "compare", *same_split], p)
    report, against = (p / "reports/compare.md").read_text().split("\n## Against ")
    best = min(rows, key=lambda name: rows[name][1]["val_loss"])
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| experiment | val loss | test acc | acc vs base | answered | lora.r |"), \
        "what decides, then the changed params"
    assert len(table) == 1 + 3, "the baseline and both experiments"
    assert [line for line in table if "★" in line] == [next(line for line in table if f" {best} |" in line)]
    # Each experiment against the baseline commit, paired over the same test examples: every metric
    # with a difference, an interval and a verdict.
    assert re.search(r"Against the runner-up, \S+, (every test difference is within noise|on test: )", report)
    assert against.startswith(baseline)
    paired = [line.split(" | ") for line in against.splitlines() if line.startswith("| small") or
              line.startswith("| large")]
    metrics = {"loss", "accuracy", "macro_f1", "answered"}
    assert {(cells[0].strip("| "), cells[1]) for cells in paired} == {(n, m) for n in ("small", "large") for m in metrics}
    assert all(cells[-1].strip(" |") in ("better", "worse", "within noise") for cells in paired)

    # The console table: what decides first, then the changed params; lowest val loss first, test metrics
    # ± the half-width of their interval.
    console = run(["env", "COLUMNS=200", *python, "exps", *same_split], p).stdout.splitlines()
    assert console[0].split()[:9] == ["experiment", "val", "loss", "test", "acc", "acc", "vs", "base", "answered"]
    assert console[0].split()[9] == "lora.r"
    assert console[1].split()[:2] == ["★", best], "lowest val loss first"
    assert len(table_lines(console)) == 1 + 3
    assert all(re.search(r"\d ±0\.\d+ ", line) for line in console[1:4]), "test metrics with their interval"
    only = run(["env", "COLUMNS=200", *python, "exps", "--exps", "small"], p).stdout.splitlines()[1:]
    assert len(only) == 1 and only[0].split()[0] == "small", "only the one named"
    narrow = run(["env", "COLUMNS=80", *python, "exps", *same_split], p).stdout.splitlines()
    assert all(len(line) <= 80 for line in narrow) and "Left out at 80 columns: " in narrow[len(table_lines(narrow))]
    assert narrow[0].split()[:5] == ["experiment", "val", "loss", "test", "acc"], "what decides stays"

    # Then every run: two test sets.
    run([*python, "compare", "--ref", "small"], p)
    against = (p / "reports/compare.md").read_text().split("\n## Against ")[1]
    assert against.startswith("small")
    assert re.search(r"\| other-split \|.*not comparable: another test set", against)
    assert "| large | accuracy |" in against and not re.search(r"^\| small \|", against, re.M), \
        "the reference is not compared with itself"
    # Best is named within a test set only; without --ref, a reference that shares the runs' test set.
    console = run(["env", "COLUMNS=200", *python, "exps"], p).stdout.splitlines()
    vals = {n: exp_rows(p)[n][1]["val_loss"] for n in ("other-split", "other-split-r16")}
    starred = [line.split()[1] for line in console if line.startswith("★")]
    other = next(name for name in starred if name in vals)  # the lowest val loss of its set (either, on a tie)
    assert sorted(starred) == sorted([best, other]), "the best of each test set, and only those"
    assert vals[other] == min(vals.values())
    assert console[0].split()[:3] == ["experiment", "test", "set"] and any(line.startswith("Runs on different test sets") for line in console)
    run([*python, "compare", "--exps", "other-split", "other-split-r16"], p)
    report, against = (p / "reports/compare.md").read_text().split("\n## Against ")
    assert f"Reference for the paired comparison: {other}, the best run by val loss" in report
    assert "not comparable" not in against and "| accuracy |" in against
    for image in ("compare-loss.png", "compare-learning.png"):
        assert (p / "reports" / image).stat().st_size > 10_000
    assert "<svg" in (p / "reports/compare.html").read_text()

    run([*python, "plots", "small", "large"], p)
    page = p / "reports/plots/index.html"
    html = page.read_text()
    assert not re.search(r"<script[^>]+src=", html), "no script is loaded from elsewhere (a CDN)"
    dom = chromium_dom(page, tmp_path)
    charts = re.findall(r'<svg[^>]*class="marks"', dom)
    assert len(charts) >= 5, f"{len(charts)} charts rendered"  # 4 curves and the confusion matrix
    lines = re.findall(r'class="mark-line role-mark[^"]*"[^>]*>(.*?)</g>', dom, flags=re.S)
    drawn = [d for d in re.findall(r'<path[^>]*d="(M[^"]+)"', "".join(lines)) if d.count("L") >= 1]
    assert len(drawn) >= 2 * 4, "every curve of both experiments is drawn"
    assert ">small<" in dom and ">large<" in dom, "the legend names the experiments"


def test_noise_runs_each_seed_once_and_writes_the_spread(tiny_project, monkeypatch):
    p = tiny_project
    python = [sys.executable, "-m", "tools.report", "noise", "--seeds", "2"]
    run(python, p)
    noise = json.loads((p / "reports/noise.json").read_text())
    assert sorted(noise["experiments"]) == ["noise-seed-1", "noise-seed-2"]
    seeds = {params["train"]["seed"] for name, (params, _) in exp_rows(p).items() if name.startswith("noise-seed-")}
    assert seeds == {1, 2}
    val = noise["metrics"]["val_loss"]
    assert val["spread"] == round(max(val["values"]) - min(val["values"]), 4) > 0, "another seed, another result"
    assert "| val_loss |" in (p / "reports/noise.md").read_text()
    run(python, p)  # a second call reuses the runs
    assert len([n for n in exp_rows(p) if n.startswith("noise-seed-")]) == 2

    # The floor applies to runs on the test set it was measured on, and to no other.
    from tools.report import test_set_of

    monkeypatch.chdir(p)
    assert noise["test_set"] == test_set_of("workspace") and noise["data"]["data/prepared"]
    compare = [sys.executable, "-m", "tools.report", "compare"]
    run(compare, p)
    assert "(2 seeds, measured on this test set) are within noise" in (p / "reports/compare.md").read_text()
    (p / "reports/noise.json").write_text(json.dumps(dict(noise, test_set="0ther5et")))
    run(compare, p)
    assert "No seed noise floor is applied: reports/noise.json was measured on another test set" in \
        (p / "reports/compare.md").read_text()


def test_a_column_has_the_digits_that_tell_its_values_apart():
    from tools.report import digits_for, with_interval

    assert digits_for([1.9701, 1.9704]) == 5 and digits_for([0.1599, 0.2]) == 4
    metrics = [dict(val_loss=v) for v in (1.9701, 1.9704)]
    assert [with_interval(m, "val_loss", digits_for([1.9701, 1.9704])) for m in metrics] == ["1.9701", "1.9704"]


def test_a_multi_line_param_and_an_interval_fit_one_cell():
    from tools.report import cell, markdown_table, with_interval

    template = "Which section is this package in?\n\n{name}: {summary}\n" * 3
    shown = cell(template)
    assert "\n" not in shown and len(shown) == 28 and shown.startswith("Which section is this packa")
    assert with_interval(dict(test_accuracy=0.9062, test_accuracy_ci_low=0.8438, test_accuracy_ci_high=0.9583),
                         "test_accuracy") == "0.9062 ±0.057"
    assert with_interval(dict(val_loss=0.1643), "val_loss") == "0.1643"
    assert markdown_table(["a"], [["x\ny|z"]]).splitlines()[-1] == "| x y\\|z |"


def test_the_table_is_of_this_commit_when_an_interrupted_exp_run_left_its_baseline_ref(tiny_project):
    """DVC reads HEAD as refs/exps/exec/EXEC_BASELINE while that ref exists; a `dvc exp run` killed
    before it removed the ref leaves `dvc exp show` on an older commit. make exps shows this one."""
    p = tiny_project
    older = run(["git", "rev-parse", "HEAD"], p).stdout.strip()
    evaluation = json.loads((p / "metrics/evaluate.json").read_text())
    (p / "metrics/evaluate.json").write_text(json.dumps(dict(evaluation, val_loss=7.25)))
    run(["git", "commit", "-qam", "a later commit, told apart by its val loss"], p)
    run(["git", "update-ref", "refs/exps/exec/EXEC_BASELINE", older], p)
    assert json.loads(run(["dvc", "exp", "show", "--json"], p).stdout)[1]["rev"] == older, "DVC's own mix-up"
    shown = run([sys.executable, "-m", "tools.report", "exps"], p)
    assert "7.25" in shown.stdout and older[:7] not in shown.stdout, "the commit's row, not the older one's"
    assert f"({older[:7]}) is left by a dvc exp run" in shown.stderr

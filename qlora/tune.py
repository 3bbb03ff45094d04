"""A hyperparameter search in which every trial is a DVC experiment: `make tune`.

    python -m qlora.tune [--config tune.yaml]

tune.yaml holds the search space (any params.yaml key), the budget (trials, minutes) and the
objective, a val metric (never test). Optuna's TPE sampler, seeded, proposes each trial; the
trial runs as `dvc exp run --temp -n <study>-<number> -S key=value ... evaluate`, so it is a
normal experiment (`dvc exp show`, `make compare`, `dvc exp apply`, `dvc exp push`) and the
workspace is left as it was. The study is an Optuna journal in reports/tune/<study>.jsonl, in
git: a search stopped at any point resumes where it stopped (a finished trial is never rerun,
a trial cut off is run again), and a teammate who pulls the repo sees and extends the same
study. Each trial writes reports/tune/<study>.{md,json,png}: objective per trial, best so
far, parameter importances, and the best trial's name.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from qlora.params import PARAMS_FILE, ParamsError, parse_params

TUNE_FILE = "tune.yaml"
FOLDER = Path("reports/tune")
KINDS = ("uniform", "loguniform", "int", "choice")
EVALUATE = "metrics/evaluate.json"
TRAIN = "metrics/train.json"
# Shown beside the objective in the report; never used to choose.
REPORTED = [(EVALUATE, "val_loss"), (EVALUATE, "test_accuracy"), (EVALUATE, "test_chrf"), (TRAIN, "steps"),
            (TRAIN, "stopped_early"), (TRAIN, "tokens_per_second")]


class TuneError(SystemExit):
    """A bad line in tune.yaml: stops before any trial, naming the file and the line."""


def load_config(path, params_path=PARAMS_FILE):
    """tune.yaml, checked: every space line names a params key and gives bounds or choices that
    params.yaml's schema accepts (each bound and each choice is tried in a copy of params.yaml)."""
    path = Path(path)
    if not path.exists():
        raise TuneError(f"{path}: file not found (make tune reads the search space from it)")
    config = yaml.safe_load(path.read_text()) or {}
    lines = path.read_text().splitlines()

    def line_of(key):
        return next((i + 1 for i, text in enumerate(lines) if text.strip().startswith(f"{key}:")), "?")

    def fail(key, what):
        raise TuneError(f"{path}, line {line_of(key)} ({key}): {what}")

    known = {"study", "objective", "direction", "trials", "minutes", "seed", "startup_trials", "space"}
    for key in config:
        if key not in known:
            fail(key, f"unknown key (known: {', '.join(sorted(known))})")
    config = dict(dict(study="tune", objective="val_loss", direction="minimize", trials=8, minutes=None, seed=42,
                       startup_trials=3, space={}), **config)
    if not str(config["study"]).replace("-", "").replace("_", "").isalnum():
        fail("study", f"a name of letters, digits, - and _, got {config['study']!r}")
    if not str(config["objective"]).startswith(("val_", "best_val_")):
        fail("objective", f"a val metric of {EVALUATE} (val_loss, best_val_loss, val_perplexity): the test split "
                          f"is never used to choose, got {config['objective']!r}")
    if config["direction"] not in ("minimize", "maximize"):
        fail("direction", f"minimize or maximize, got {config['direction']!r}")
    for key in ("trials", "startup_trials"):
        if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1:
            fail(key, f"a positive integer, got {config[key]!r}")
    if config["minutes"] is not None and not (isinstance(config["minutes"], (int, float)) and config["minutes"] > 0):
        fail("minutes", f"a positive number or null, got {config['minutes']!r}")
    if not isinstance(config["space"], dict) or not config["space"]:
        fail("space", "a mapping of params keys to ranges, e.g. train.learning_rate: loguniform 1e-5 1e-2")

    params = yaml.safe_load(Path(params_path).read_text())
    space = {}
    for key, text in config["space"].items():
        if not _has_key(params, key):
            fail(key, f"no such key in {params_path}")
        space[key] = dist = _distribution(key, text, fail)
        for value in _extremes(dist):
            _check_value(params, key, value, params_path, lambda what: fail(key, what))
    config["space"] = space
    return config


def _has_key(params, key):
    node = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, dict)


def _distribution(key, text, fail):
    """`loguniform 1e-5 1e-2`, `uniform 0 0.2`, `int 4 32` or `choice [4, 8, 16]`."""
    kind, _, rest = str(text).strip().partition(" ")
    if kind not in KINDS:
        fail(key, f"a range: one of {', '.join(KINDS)} and its bounds or list, got {text!r}")
    if kind == "choice":
        values = yaml.safe_load(rest) if rest.strip() else None
        if not isinstance(values, list) or not values:
            fail(key, f"choice needs a list of values, e.g. choice [4, 8, 16], got {text!r}")
        return dict(kind=kind, values=values)
    try:
        low, high = (float(v) for v in rest.split())
    except ValueError:
        fail(key, f"{kind} needs two numbers, low and high, e.g. {kind} 0 1, got {text!r}")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        fail(key, f"int needs integer bounds, got {text!r}")
    if low >= high:
        fail(key, f"low must be below high, got low {low:g} and high {high:g}")
    if kind == "loguniform" and low <= 0:
        fail(key, f"loguniform needs a positive low bound, got {low:g}")
    return dict(kind=kind, low=int(low) if kind == "int" else low, high=int(high) if kind == "int" else high)


def _extremes(dist):
    return dist["values"] if dist["kind"] == "choice" else [dist["low"], dist["high"]]


def _set(params, key, value):
    node = params
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def _check_value(params, key, value, params_path, fail):
    import copy

    trial = copy.deepcopy(params)
    _set(trial, key, value)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as tmp:
        yaml.safe_dump(trial, tmp)
        tmp.flush()
        try:
            parse_params(tmp.name)
        except ParamsError as err:
            fail(f"{value!r} is refused by {params_path}'s schema: {str(err).split(': ', 1)[1]}")


def suggest(trial, space):
    values = {}
    for key, d in space.items():
        if d["kind"] == "choice":
            values[key] = trial.suggest_categorical(key, d["values"])
        elif d["kind"] == "int":
            values[key] = trial.suggest_int(key, d["low"], d["high"])
        else:
            values[key] = trial.suggest_float(key, d["low"], d["high"], log=d["kind"] == "loguniform")
    return values


def set_args(values):
    args = []
    for key, value in values.items():
        args += ["-S", f"{key}={json.dumps(value) if isinstance(value, (list, dict, bool)) else value}"]
    return args


def open_study(config, folder=FOLDER):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    folder.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(folder / f"{config['study']}.jsonl")))
    # Seeded by the trials so far as well: a resumed search draws on, rather than repeating its first draws.
    done = len(storage.get_all_trials(storage.get_study_id_from_name(config["study"]))) \
        if config["study"] in [s.study_name for s in storage.get_all_studies()] else 0
    sampler = optuna.samplers.TPESampler(seed=config["seed"] + done, n_startup_trials=config["startup_trials"])
    return optuna.create_study(study_name=config["study"], storage=storage, sampler=sampler,
                               direction=config["direction"], load_if_exists=True)


def experiment_names():
    """Every experiment's name, whatever commit it was run on."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], capture_output=True, text=True)
    return {r.rsplit("/", 1)[-1] for r in refs.stdout.split()}


def experiment_metrics(name):
    """The metrics files of experiment `name`, read from its git ref: found whatever commit it was run
    on (the branch may have moved on while the search ran)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], capture_output=True, text=True)
    ref = next((r for r in refs.stdout.split() if r.rsplit("/", 1)[-1] == name), None)
    metrics = {}
    for file in (EVALUATE, TRAIN):
        shown = subprocess.run(["git", "show", f"{ref}:{file}"], capture_output=True, text=True) if ref else None
        if shown and shown.returncode == 0:
            metrics[file] = json.loads(shown.stdout)
    return metrics


def recover(study):
    """Trials a killed search left running: their experiment finished (told now from its metrics)
    or did not (marked failed, and the same params run again first)."""
    from optuna.trial import TrialState

    names = experiment_names()
    retry = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        name = trial.user_attrs.get("experiment")
        if name in names:
            tell(study, trial._trial_id, name, experiment_metrics(name), trial.user_attrs.get("objective", "val_loss"))
        else:
            study._storage.set_trial_user_attr(trial._trial_id, "error", "interrupted; run again")
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            if trial.params:
                retry.append(trial.params)
    for params in retry:
        study.enqueue_trial(params, skip_if_exists=False)


def tell(study, trial_id, name, metrics, objective):
    from optuna.trial import TrialState

    storage = study._storage
    for file, key in REPORTED:
        value = metrics.get(file, {}).get(key)
        if value is not None:
            storage.set_trial_user_attr(trial_id, key, value)
    value = metrics.get(EVALUATE, {}).get(objective)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        storage.set_trial_user_attr(trial_id, "error", f"{EVALUATE} has no finite {objective}")
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        return None
    storage.set_trial_state_values(trial_id, state=TrialState.COMPLETE, values=[float(value)])
    return value


def run_trial(study, config):
    from optuna.trial import TrialState

    trial = study.ask()
    values = suggest(trial, config["space"])
    name = f"{config['study']}-{trial.number}"
    trial.set_user_attr("experiment", name)
    trial.set_user_attr("objective", config["objective"])
    print(f"tune: trial {trial.number} ({len(finished(study))} of {config['trials']} finished so far), {name}: "
          + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()), flush=True)
    cmd = ["dvc", "exp", "run", "--temp", "-n", name, *set_args(values), "evaluate"]
    result = subprocess.run(cmd, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        reason = (result.stderr.strip().splitlines() or ["dvc exp run failed"])[-1][:300]
        study._storage.set_trial_user_attr(trial._trial_id, "error", reason)
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        print(f"tune: {name} failed: {reason}", flush=True)
        return
    value = tell(study, trial._trial_id, name, experiment_metrics(name), config["objective"])
    print(f"tune: {name}: {config['objective']} = {value}", flush=True)


def finished(study):
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def search(config, folder=FOLDER):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(config, folder)
    recover(study)
    start = time.time()
    while len(finished(study)) < config["trials"]:
        if config["minutes"] and time.time() - start > 60 * config["minutes"]:
            print(f"tune: the {config['minutes']}-minute budget is spent; rerun to go on", flush=True)
            break
        run_trial(study, config)
        write_report(study, config, folder)
        if len([t for t in study.get_trials(deepcopy=False) if t.state.name == "FAIL"]) >= config["trials"]:
            raise SystemExit(f"tune: {config['trials']} trials failed; see {folder / config['study']}.md")
    return write_report(study, config, folder)


def importances(study):
    import optuna

    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as err:  # fewer than two finished trials, or one value everywhere
        return {"(not yet)": str(err)}


def write_report(study, config, folder=FOLDER):
    """reports/tune/<study>.{json,md,png}: every trial, best so far, importances, the best trial."""
    from qlora.outputs import provenance
    from qlora.report import markdown_table

    sign = 1 if config["direction"] == "minimize" else -1
    rows, best = [], None
    for t in study.get_trials(deepcopy=False):
        value = t.values[0] if t.values else None
        if value is not None and (best is None or sign * value < sign * best):
            best = value
        rows.append(dict(number=t.number, experiment=t.user_attrs.get("experiment"), state=t.state.name.lower(),
                         params=t.params, value=value, best_so_far=best,
                         **{k: t.user_attrs[k] for k in ("stopped_early", "test_accuracy", "test_chrf", "steps",
                                                         "tokens_per_second", "error") if k in t.user_attrs}))
    done = [r for r in rows if r["value"] is not None]
    top = min(done, key=lambda r: sign * r["value"]) if done else None
    result = dict(study=config["study"], objective=config["objective"], direction=config["direction"],
                  budget=config["trials"], space={k: v for k, v in config["space"].items()}, trials=rows,
                  best=top, importances=importances(study) if len(done) > 1 else {}, **provenance())
    name = folder / config["study"]
    name.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    name.with_suffix(".md").write_text(markdown(result, markdown_table))
    if done:
        plot(result, name.with_suffix(".png"))
    return result


def fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def trials_table(result, markdown_table):
    keys = list(result["space"])
    head = ["trial", "experiment", *keys, result["objective"], "best so far", "state", "test acc (reported)"]
    body = [[str(r["number"]), r["experiment"] or "", *(fmt(r["params"].get(k)) for k in keys), fmt(r["value"]),
             fmt(r["best_so_far"]), r["state"] + (" (stopped early)" if r.get("stopped_early") else ""),
             fmt(r.get("test_accuracy"))] for r in result["trials"]]
    return markdown_table(head, body)


def markdown(result, markdown_table):
    best = result["best"]
    lines = [f"# Study {result['study']}", "",
             f"Objective: {result['direction']} `{result['objective']}` (val split; test is shown, never used). "
             f"{sum(r['value'] is not None for r in result['trials'])} of {result['budget']} trials finished.", "",
             trials_table(result, markdown_table), ""]
    if best:
        lines += [f"Best: **{best['experiment']}**, {result['objective']} = {fmt(best['value'])}, with "
                  + ", ".join(f"`{k}={fmt(v)}`" for k, v in best["params"].items())
                  + f". Restore it with `dvc exp apply {best['experiment']}`.", ""]
    if result["importances"]:
        lines += ["Parameter importances (Optuna's fANOVA over the finished trials; with few trials, a rough guide):",
                  "", markdown_table(["param", "importance"],
                                     [[k, fmt(v)] for k, v in result["importances"].items()]), ""]
    lines += [f"![objective per trial](./{result['study']}.png)", ""]
    return "\n".join(lines)


def plot(result, png):
    import vl_convert

    values = []
    for r in result["trials"]:
        if r["value"] is not None:
            values += [dict(trial=r["number"], value=r["value"], series="trial"),
                       dict(trial=r["number"], value=r["best_so_far"], series="best so far")]
    spec = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json", "width": 480, "height": 260,
        "title": f"{result['study']}: {result['objective']} per trial", "data": {"values": values},
        "layer": [
            {"transform": [{"filter": "datum.series == 'trial'"}], "mark": {"type": "point", "filled": True},
             "encoding": {"x": {"field": "trial", "type": "quantitative"},
                          "y": {"field": "value", "type": "quantitative", "title": result["objective"],
                                "scale": {"zero": False}},
                          "color": {"field": "series", "type": "nominal", "title": None}}},
            {"transform": [{"filter": "datum.series == 'best so far'"}], "mark": {"type": "line", "interpolate": "step-after"},
             "encoding": {"x": {"field": "trial", "type": "quantitative"}, "y": {"field": "value", "type": "quantitative"},
                          "color": {"field": "series", "type": "nominal", "title": None}}},
        ],
    }
    png.write_bytes(vl_convert.vegalite_to_png(spec, scale=2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=TUNE_FILE, help="the search space, budget and objective")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    result = search(config)
    best = result["best"]
    print(f"tune: wrote {FOLDER / config['study']}.md"
          + (f"; best {best['experiment']} ({config['objective']} {fmt(best['value'])}): dvc exp apply "
             f"{best['experiment']}" if best else ""))


if __name__ == "__main__":
    main()

"""A hyperparameter search in which every trial is a DVC experiment, run by one worker or by many
on many machines: `make tune`.

    python -m tools.tune [--config tune.yaml]           # a worker: runs trials until the budget is reached
    python -m tools.tune report [--config ...] [--pull] # the study's report, from any clone

tune.yaml holds the search space (any params.yaml key), the budget (trials, minutes), the objective
(a val metric, never test), the pruner and the study's storage. Optuna's TPE sampler, seeded,
proposes each trial; the trial runs as `dvc exp run --temp -n <study>-<number> -S key=value ...
-S train.trial=<study>/<number> evaluate`, a normal experiment (`dvc exp show`, `make compare`,
`dvc exp apply`), and the clone's params.yaml and dvc.lock are left as they were. During
training the run reports its val loss to its trial, and the study's pruner may stop it.

The storage is a journal file, reports/tune/<study>.jsonl (commit it), for workers of one
machine; or a database URL (PostgreSQL) for workers anywhere. A worker is this command in any
clone: N workers are N such commands, one per GPU. The budget is the study's, not a worker's; a
worker added mid-study joins it; a worker killed mid-trial loses only that run (its trial is marked
failed, by Optuna's heartbeat with a database or because its process is gone on this machine, and
run again by a live worker); while the storage is unreachable, workers wait and go on. With
`push: <git remote>` each finished trial is pushed (`dvc exp push`: its git ref, and its outputs
to the DVC remote); a push that fails is retried, and kept to push later, never lost.
Each worker writes reports/tune/<study>.{md,json,png}: every trial with its experiment and commit,
best so far, parameter importances, and the best trial's `dvc exp apply`.
"""

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from qlora.params import PARAMS_FILE, ParamsError, parse_params
from qlora.tasks import TASKS
from qlora.trial import PRUNERS, STORAGE_ENV, open_storage, retrying
from tools.report import DETAILS, details

TUNE_FILE = "tune.yaml"
FOLDER = Path("reports/tune")
KINDS = ("uniform", "loguniform", "int", "choice")
EVALUATE, TRAIN = DETAILS  # the files a trial's figures come from, as make exps reads them


def objectives():
    """The objectives a study may choose by, all on the val split, and which way is better: the loss, and
    each task's metrics (but answered) in the direction its task says."""
    return {"val_loss": "minimize", "best_val_loss": "minimize", "val_perplexity": "minimize",
            **{f"val_{m}": "maximize" if t().better(m) > 0 else "minimize"
               for t in TASKS.values() for m in t.metrics if m != "answered"}}


def reported():
    """Shown beside the objective in the report, never used to choose: each task's primary metric."""
    return [(EVALUATE, "val_loss"), *[(EVALUATE, f"{split}_{t.primary}") for split in ("val", "test")
                                      for t in TASKS.values()],
            (TRAIN, "steps"), (TRAIN, "stopped_early"), (TRAIN, "pruned"), (TRAIN, "tokens_per_second")]


DEFAULTS = dict(study="tune", storage=None, objective="val_loss", direction=None, trials=8, minutes=None, seed=42,
                startup_trials=3, pruner="none", push=None, heartbeat_seconds=60, wait_minutes=30, space={})


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

    for key in config:
        if key not in DEFAULTS:
            fail(key, f"unknown key (known: {', '.join(sorted(DEFAULTS))})")
    config = dict(DEFAULTS, **config)
    if not str(config["study"]).replace("-", "").replace("_", "").isalnum():
        fail("study", f"a name of letters, digits, - and _, got {config['study']!r}")
    allowed = objectives()
    if config["objective"] not in allowed:
        fail("objective", f"a val metric of {EVALUATE} ({', '.join(allowed)}): the test split is never used "
                          f"to choose, got {config['objective']!r}")
    better = allowed[config["objective"]]
    if config["direction"] is None:
        config["direction"] = better
    elif config["direction"] != better:
        fail("direction", f"{better} for {config['objective']} (or leave it out), got {config['direction']!r}")
    for key in ("trials", "startup_trials", "heartbeat_seconds"):
        if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1:
            fail(key, f"a positive integer, got {config[key]!r}")
    for key in ("minutes", "wait_minutes"):
        if config[key] is not None and not (isinstance(config[key], (int, float)) and config[key] > 0):
            fail(key, f"a positive number or null, got {config[key]!r}")
    if config["pruner"] not in PRUNERS:
        fail("pruner", f"one of {', '.join(PRUNERS)}, got {config['pruner']!r}")
    if config["storage"] is not None and "://" not in str(config["storage"]):
        fail("storage", f"null (the journal file {FOLDER}/<study>.jsonl) or a database URL such as "
                        f"postgresql://user:password@host:5432/db, got {config['storage']!r}")
    if config["push"] is not None:
        remotes = subprocess.run(["git", "remote"], capture_output=True, text=True).stdout.split()  # this clone's
        if config["push"] not in remotes:
            fail("push", f"a git remote of this clone ({', '.join(remotes) or 'none'}), or null, got "
                         f"{config['push']!r}")
    if not isinstance(config["space"], dict) or not config["space"]:
        fail("space", "a mapping of params keys to ranges, e.g. train.learning_rate: loguniform 1e-5 1e-2")

    params = yaml.safe_load(Path(params_path).read_text())
    space = {}
    for key, text in config["space"].items():
        if not _has_key(params, key):
            fail(key, f"no such key in {params_path}")
        if key == "train.trial":
            fail(key, "set by the worker for each trial, not searched")
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


def storage_url(config, folder=FOLDER):
    """The study's storage: its database URL, or the absolute path of its journal file in this clone."""
    return config["storage"] or str((folder / f"{config['study']}.jsonl").resolve())


def open_study(config, folder=FOLDER, storage=None):
    import optuna

    folder.mkdir(parents=True, exist_ok=True)
    storage = storage or open_storage(storage_url(config, folder), config["heartbeat_seconds"])
    study = retrying(lambda: optuna.create_study(study_name=config["study"], storage=storage,
                                                 direction=config["direction"], load_if_exists=True),
                     "open the study", config["wait_minutes"], say)
    if "pruner" not in study.user_attrs:  # read by each trial's train stage (qlora/trial.py)
        retrying(lambda: study.set_user_attr("pruner", dict(kind=config["pruner"],
                                                            startup_trials=config["startup_trials"])),
                 "record the pruner", config["wait_minutes"], say)
    return study


def reseed(study, config, count):
    """TPE seeded by the count of trials so far: a resumed search draws on rather than repeating its
    first draws, and workers asking one after another draw apart. The constant liar counts the trials
    other workers are running as done, so that TPE does not propose their params again."""
    import optuna

    study.sampler = optuna.samplers.TPESampler(seed=config["seed"] + count, n_startup_trials=config["startup_trials"],
                                               constant_liar=True)


def say(text):
    print(text, flush=True)


def experiment_refs():
    """Every experiment's name and git ref, whatever commit it was run on."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"],
                          capture_output=True, text=True)
    return {ref.rsplit("/", 1)[-1]: (ref, sha) for ref, sha in (line.split() for line in refs.stdout.splitlines())}


def experiment_metrics(ref):
    """The metrics files of an experiment, read from its git ref: found whatever commit it was run on
    (the branch may have moved on while the search ran)."""
    return details(ref, scored=bool(ref))


def clone_id():
    """This clone on this machine: which worker ran a trial, and where its experiment waits to be pushed."""
    return f"{socket.gethostname()}:{Path.cwd().resolve()}"


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def reap(study, config):
    """Trials whose worker is gone, marked failed, their params enqueued to run again: by Optuna's heartbeat
    with a database (workers anywhere); with a journal (workers of this machine, no heartbeat), any trial
    whose worker process has exited."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    if "://" in storage_url(config):
        optuna.storages.fail_stale_trials(study)
        return
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # A retry just asked for carries the attributes of the trial it replaces until its worker records
        # its own (the worker first, its experiment's name last): until then it is not judged.
        worker, claimed = trial.user_attrs.get("worker", ""), trial.user_attrs.get("experiment") == \
            f"{config['study']}-{trial.number}"
        if claimed and worker.rpartition(":")[0] == host and not alive(int(worker.rpartition(":")[2])):
            try:  # the attribute first: a finished trial takes none
                study._storage.set_trial_user_attr(trial._trial_id, "error", "interrupted: its worker is gone; "
                                                                              "run again")
                study.tell(trial.number, state=TrialState.FAIL)
            except (RuntimeError, ValueError):  # another worker reaped it first
                continue
            RetryHeartbeatStaleTrialCallback(max_retry=3)(study, study._storage.get_trial(trial._trial_id))


def counts(study):
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return (sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials),
            sum(t.state == TrialState.RUNNING for t in trials), len(trials))


def failed_runs(study):
    """Trials whose experiment itself failed (not cut off by a lost worker, not over the budget)."""
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == "FAIL"
            and not str(t.user_attrs.get("error", "")).startswith(("interrupted", "over the budget"))]


def one_worker_per_clone():
    """A lock held while this worker runs: a second worker in the same clone stops, saying why. The lock
    goes with the process, however it ends."""
    import fcntl

    path = Path(".dvc/tmp/tune-worker.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"tune: another worker runs in this clone ({Path.cwd()}); start each worker in a clone "
                         f"of its own (git clone, dvc pull; docs/scaling.md)") from None
    return handle


def work(config, folder=FOLDER):
    """One worker: asks the study for trials and runs them until the study's budget is reached."""
    import optuna

    lock = one_worker_per_clone()  # noqa: F841 - held until the worker exits
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    storage = open_storage(storage_url(config, folder), config["heartbeat_seconds"])
    study = open_study(config, folder, storage)
    wait = config["wait_minutes"]
    start = time.time()
    while True:
        retrying(lambda: reap(study, config), "mark lost trials failed", wait, say)
        push_pending(study, config)
        finished, running, total = retrying(lambda: counts(study), "count the trials", wait, say)
        if finished >= config["trials"]:
            break
        if config["minutes"] and time.time() - start > 60 * config["minutes"]:
            say(f"tune: the {config['minutes']}-minute budget is spent; rerun to go on")
            break
        if finished + running >= config["trials"]:  # the rest are running elsewhere; take one over if it dies
            time.sleep(min(config["heartbeat_seconds"], 10))
            continue
        reseed(study, config, total)
        trial = retrying(study.ask, "ask for a trial", wait, say)
        run_trial(study, config, trial, storage)
        write_report(study, config, folder)
        if len(failed_runs(study)) >= config["trials"]:
            raise SystemExit(f"tune: {config['trials']} trials failed; see {folder / config['study']}.md")
    push_pending(study, config, final=True)
    return write_report(study, config, folder)


def over_budget(study, config, trial):
    """Whether trials finished, or running with a smaller number, already make the budget: two workers
    that asked at the same instant. The later one gives its trial up (its params, if enqueued, are
    enqueued again)."""
    from optuna.trial import TrialState

    ahead = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number and
             (t.state in (TrialState.COMPLETE, TrialState.PRUNED) or
              (t.state == TrialState.RUNNING and t.number < trial.number))]
    return len(ahead) >= config["trials"]


def beats(storage):
    """Whether the storage keeps Optuna's heartbeat of running trials (a database opened with one)."""
    from optuna.storages import RDBStorage

    return isinstance(storage, RDBStorage) and storage.get_heartbeat_interval() is not None


def heartbeat(storage, trial_id, seconds, stop):
    """Optuna's heartbeat of a running trial, beating while the storage is reachable."""
    while not stop.wait(seconds):
        try:
            storage.record_heartbeat(trial_id)
        except Exception as err:  # noqa: BLE001 - a storage that is down: the next beat tries again
            say(f"tune: the study's storage is unreachable (heartbeat: {str(err).splitlines()[0][:120]}); "
                f"beating again in {seconds} s")


def run_trial(study, config, trial, storage):
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    wait = config["wait_minutes"]
    name = f"{config['study']}-{trial.number}"
    # A retried trial arrives with the attributes of the one it replaces: each is set anew, the error cleared.
    for key, value in (("worker", f"{socket.gethostname()}:{os.getpid()}"), ("clone", clone_id()),
                       ("objective", config["objective"]), *((("error", None),) if "error" in trial.user_attrs else ()),
                       ("experiment", name)):  # the name last: it marks the trial as this worker's (see reap)
        retrying(lambda: trial.set_user_attr(key, value), "record the trial", wait, say)
    if beats(storage):
        retrying(lambda: storage.record_heartbeat(trial._trial_id), "record a heartbeat", wait, say)
    if over_budget(study, config, trial):
        retrying(lambda: trial.set_user_attr("error", "over the budget: another worker asked at the same time"),
                 "record the trial", wait, say)
        retrying(lambda: study.tell(trial, state=TrialState.FAIL), "give the trial up", wait, say)
        fixed = study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params")
        if fixed:
            study.enqueue_trial(fixed, skip_if_exists=False)
        return
    values = suggest(trial, config["space"])
    finished = retrying(lambda: counts(study)[0], "count the trials", wait, say)
    say(f"tune: trial {trial.number} ({finished} of {config['trials']} finished so far), {name}: "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
    cmd = ["dvc", "exp", "run", "--temp", "-n", name, *set_args(values),
           "-S", f"train.trial={config['study']}/{trial.number}", "evaluate"]
    stop = threading.Event()
    if beats(storage):
        threading.Thread(target=heartbeat, args=(storage, trial._trial_id, config["heartbeat_seconds"], stop),
                         daemon=True).start()
    try:
        result = subprocess.run(cmd, stdout=sys.stdout, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, **{STORAGE_ENV: storage_url(config)}))
    finally:
        stop.set()
    try:
        if result.returncode == 0:
            tell(study, trial, name, config, wait)
        else:
            sys.stderr.write(result.stderr)
            reason = (result.stderr.strip().splitlines() or ["dvc exp run failed"])[-1][:300]
            retrying(lambda: trial.set_user_attr("error", reason), "record the failure", wait, say)
            retrying(lambda: study.tell(trial, state=TrialState.FAIL), "record the failure", wait, say)
            say(f"tune: {name} failed: {reason}")
    except (UpdateFinishedTrialError, ValueError):  # setting an attribute of, or telling, a finished trial
        if study._storage.get_trial(trial._trial_id).state != TrialState.FAIL:
            raise
        # Another worker failed it meanwhile: its heartbeat lapsed (the storage was unreachable for longer
        # than twice heartbeat_seconds). Its params run again there; this run is not counted.
        say(f"tune: {name}'s trial was marked failed by another worker meanwhile (its heartbeat lapsed); "
            f"its params run again, and this run is not counted")


def tell(study, trial, name, config, wait):
    """The trial's result, from its experiment's metrics: complete with the objective's value, or pruned."""
    from optuna.trial import TrialState

    ref, commit = experiment_refs().get(name, (None, None))
    metrics = experiment_metrics(ref)
    objective = config["objective"]
    for file, key in reported():
        value = metrics.get(file, {}).get(key)
        if value is not None:
            retrying(lambda: trial.set_user_attr(key, value), "record the metrics", wait, say)
    retrying(lambda: trial.set_user_attr("commit", commit), "record the commit", wait, say)
    value = metrics.get(EVALUATE, {}).get(objective)
    if metrics.get(TRAIN, {}).get("pruned"):
        retrying(lambda: study.tell(trial, state=TrialState.PRUNED), "record the result", wait, say)
        say(f"tune: {name} pruned at step {metrics[TRAIN]['steps']} ({objective} {value})")
    elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        retrying(lambda: trial.set_user_attr("error", f"{EVALUATE} has no finite {objective}"), "record", wait, say)
        retrying(lambda: study.tell(trial, state=TrialState.FAIL), "record the failure", wait, say)
        say(f"tune: {name} failed: {EVALUATE} has no finite {objective}")
        return
    else:
        retrying(lambda: study.tell(trial, float(value)), "record the result", wait, say)
        say(f"tune: {name}: {objective} = {value}")


def pushed_key(name):
    return f"pushed:{name}"  # a study attribute: a finished trial takes no more attributes of its own


def push_pending(study, config, final=False):
    """`dvc exp push` of every finished trial of this clone not yet pushed; a push that fails is kept for
    the next call. With `final`, tries until all are pushed or wait_minutes have passed."""
    from optuna.trial import TrialState

    if not config["push"]:
        return
    me, wait, start = clone_id(), config["wait_minutes"], time.time()
    while True:
        done = retrying(lambda: study.user_attrs, "read the study", wait, say)
        pending = [t for t in retrying(lambda: study.get_trials(deepcopy=False), "list the trials", wait, say)
                   if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.user_attrs.get("clone") == me
                   and not done.get(pushed_key(t.user_attrs["experiment"]))]
        for trial in list(pending):
            name = trial.user_attrs["experiment"]
            result = subprocess.run(["dvc", "exp", "push", config["push"], name], capture_output=True, text=True)
            if result.returncode == 0:
                retrying(lambda: study.set_user_attr(pushed_key(name), True), "record the push", wait, say)
                pending.remove(trial)
                say(f"tune: pushed {name} to {config['push']}")
            else:
                reason = (result.stderr.strip().splitlines() or ["failed"])[-1][:200]
                say(f"tune: push of {name} failed ({reason}); kept, to push later")
        if not final or not pending:
            return
        if time.time() - start > 60 * wait:
            raise SystemExit(f"tune: {len(pending)} finished trials of this clone are not pushed to "
                             f"{config['push']} after {wait} minutes: rerun to push them "
                             f"({', '.join(t.user_attrs['experiment'] for t in pending)})")
        time.sleep(10)


def importances(study):
    import optuna

    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as err:  # fewer than two finished trials, or one value everywhere
        return {"(not yet)": str(err)}


def write_report(study, config, folder=FOLDER):
    """reports/tune/<study>.{json,md,png}: every trial, best so far, importances, the best trial."""
    from qlora.outputs import provenance
    from tools.report import markdown_table

    sign = 1 if config["direction"] == "minimize" else -1
    trials = retrying(lambda: study.get_trials(deepcopy=False), "read the study", config["wait_minutes"], say)
    pushed = retrying(lambda: study.user_attrs, "read the study", config["wait_minutes"], say)
    rows, best = [], None
    for t in trials:
        value = t.values[0] if t.values and t.state.name == "COMPLETE" else None
        if value is not None and (best is None or sign * value < sign * best):
            best = value
        rows.append(dict(number=t.number, experiment=t.user_attrs.get("experiment"), state=t.state.name.lower(),
                         params=t.params, value=value, best_so_far=best,
                         pruned_at=max(t.intermediate_values) if t.state.name == "PRUNED" and t.intermediate_values
                         else None,
                         seconds=round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
                         if t.datetime_complete and t.datetime_start else None,
                         pushed=bool(pushed.get(pushed_key(t.user_attrs.get("experiment")))),
                         **{k: t.user_attrs[k] for k in ("commit", "worker", "stopped_early", *(k for _, k in reported()),
                                                         "error") if k in t.user_attrs}))
    done = [r for r in rows if r["value"] is not None]
    top = min(done, key=lambda r: sign * r["value"]) if done else None
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    result = dict(study=config["study"], objective=config["objective"], direction=config["direction"],
                  budget=config["trials"], pruner=config["pruner"], space=dict(config["space"]), trials=rows,
                  workers=len({r.get("worker") for r in rows if r.get("worker")}),
                  wall_seconds=round((max(ends) - min(starts)).total_seconds(), 1) if starts and ends else None,
                  best=top, importances=importances(study) if len(done) > 1 else {}, **provenance())
    name = folder / config["study"]
    folder.mkdir(parents=True, exist_ok=True)
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
    tests = [k for _, k in reported() if k.startswith("test_")]  # each task's primary metric on test
    head = ["trial", "experiment", "commit", *keys, result["objective"], "best so far", "state", "test (reported)"]
    body = [[str(r["number"]), r["experiment"] or "", (r.get("commit") or "")[:7],
             *(fmt(r["params"].get(k)) for k in keys), fmt(r["value"]), fmt(r["best_so_far"]),
             r["state"] + (f" at step {r['pruned_at']}" if r.get("pruned_at") is not None else "")
             + (" (stopped early)" if r.get("stopped_early") and r["state"] != "pruned" else ""),
             " ".join(f"{k.removeprefix('test_')} {fmt(r[k])}" for k in tests if r.get(k) is not None)]
            for r in result["trials"]]
    return markdown_table(head, body)


def best_line(result):
    best = result["best"]
    return (f"Best: **{best['experiment']}**, {result['objective']} {fmt(best['value'])}, with "
            + ", ".join(f"`{k}={fmt(v)}`" for k, v in best["params"].items()))


def markdown(result, markdown_table):
    best = result["best"]
    finished = sum(r["state"] in ("complete", "pruned") for r in result["trials"])
    lines = [f"# Study {result['study']}", "",
             f"Objective: {result['direction']} `{result['objective']}` (val split; test is shown, never used). "
             f"{finished} of {result['budget']} trials finished "
             f"({sum(r['state'] == 'pruned' for r in result['trials'])} pruned by the {result['pruner']} pruner), "
             f"by {result['workers']} worker(s).", "",
             trials_table(result, markdown_table), ""]
    if best:
        lines += [best_line(result) + f". Restore it with `dvc exp apply {best['experiment']}` (in another clone, "
                    f"`dvc exp pull <remote> {best['experiment']}` first).", ""]
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


def report(config, pull=None, folder=FOLDER):
    """The study's report on this clone, read from its storage; with `pull` (a git remote), its trials'
    experiments are fetched first (`dvc exp pull`), so that they can be compared and applied here."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(config, folder)
    names = [t.user_attrs["experiment"] for t in study.get_trials(deepcopy=False)
             if t.state.name in ("COMPLETE", "PRUNED") and "experiment" in t.user_attrs]
    if pull and names:
        result = subprocess.run(["dvc", "exp", "pull", pull, *names], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"tune: dvc exp pull {pull} failed:\n{result.stderr.strip()}")
    return write_report(study, config, folder)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.tune", description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=["work", "report"], default="work",
                        help="work: run trials until the study's budget is reached (default); report: write the "
                             "study's report from its storage")
    parser.add_argument("--config", default=TUNE_FILE, help="the search space, budget, objective and storage")
    parser.add_argument("--pull", metavar="REMOTE", help="report: dvc exp pull the trials' experiments first")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    result = report(config, args.pull) if args.command == "report" else work(config)
    best = result["best"]
    print(f"tune: wrote {FOLDER / config['study']}.md"
          + (f"; best {best['experiment']} ({config['objective']} {fmt(best['value'])}): dvc exp apply "
             f"{best['experiment']}" if best else ""))


if __name__ == "__main__":
    main()

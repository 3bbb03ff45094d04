"""One study, many workers: a real PostgreSQL (pgserver) holds the study, a bare git origin and a
SeaweedFS S3 server are the team's remotes, and three clones stand for three machines. Two workers
share a tiny study; one is SIGKILLed mid-trial and its trial runs again elsewhere; every finished
trial is an experiment on the git remote that a third clone pulls and reports. Then pruning: a
hopeless trial is stopped mid-run by the median pruner, its curve and experiment kept."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import run
from test_remotes import clone, commit, publish
from tools.s3server import S3Server

STUDY = """\
study: {study}
storage: {storage}
objective: {objective}
trials: {trials}
seed: 1
startup_trials: {startup}
pruner: {pruner}
push: {push}
heartbeat_seconds: 4
wait_minutes: 2
space:
  train.learning_rate: loguniform 1e-4 1e-2
  lora.r: choice [2, 4]
"""


def pgserver(folder, *args):
    """`python -m tools.pgserver` (make pg-server): starts the server, or stops it, and returns what it printed."""
    result = subprocess.run([sys.executable, "-W", "ignore", "-m", "tools.pgserver", str(folder), *args],
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.fixture
def pg(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pg")
    url = pgserver(folder)
    yield url, folder
    pgserver(folder, "--stop")


def worker(clone_dir, *args):
    """`python -m tools.tune` in a clone: one worker, in a process group of its own (as on its own machine)."""
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    return subprocess.Popen([sys.executable, "-m", "tools.tune", *args], cwd=clone_dir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)


def load(url, study):
    import optuna

    return optuna.load_study(study_name=study, storage=url)


def remote_experiments(origin):
    refs = subprocess.run(["git", "ls-remote", str(origin), "refs/exps/*"], capture_output=True, text=True).stdout
    return {line.split()[1].rsplit("/", 1)[-1]: line.split()[0] for line in refs.splitlines()}


@pytest.mark.fault("A worker SIGKILLed mid-trial (a study in PostgreSQL, two workers on two clones)",
                   sees="its trial turns FAIL once its heartbeat lapses; a live worker runs the same params as a "
                        "new trial", lost="that one run")
@pytest.mark.fault("PostgreSQL stopped and restarted mid-study",
                   sees="`tune: the study's storage is unreachable (...); retrying`; the workers and the trial "
                        "running go on", lost="nothing")
@pytest.mark.fault("A worker started on a clone mid-study, where one was killed",
                   sees="it joins the study and takes the next trial", lost="nothing")
@pytest.mark.fault("Two workers, and a third started mid-study, on one budget",
                   sees="exactly `trials` trials finish (complete or pruned), none twice",
                   lost="nothing")
def test_two_workers_share_a_study_and_one_killed_mid_trial_loses_only_its_run(tiny_project, pg, tmp_path):
    (url, pg_folder), p, origin = pg, tiny_project, tmp_path / "origin.git"
    with S3Server(tmp_path / "s3") as s3:
        publish(p, origin)
        s3.configure_dvc(p)
        (p / "tune.yaml").write_text(STUDY.format(study="shared", storage=url, objective="val_loss", trials=3,
                                                  startup=2, pruner="none", push="origin"))
        commit(p, "a study shared by workers")
        run(["dvc", "push"], p)
        b = clone(origin, tmp_path / "machine-b", s3)
        run(["dvc", "pull"], b)
        before = {c: (c / "params.yaml").read_text() + (c / "dvc.lock").read_text() for c in (p, b)}

        first, second = worker(p), worker(b)
        out_b = []
        for line in second.stdout:  # the second worker is killed a few seconds into its first trial
            out_b.append(line)
            if line.startswith("tune: trial "):
                killed = int(line.split()[2])
                time.sleep(4)
                os.killpg(second.pid, signal.SIGKILL)
                break
        second.wait()
        # The database goes down under the live worker for 4 s and comes back, within the heartbeat's grace.
        pgserver(pg_folder, "--stop")
        time.sleep(4)
        assert pgserver(pg_folder) == url
        time.sleep(4)  # a beat of the live worker's since the restart (the next worker reaps stale trials)
        third = worker(b)  # machine B's worker restarted: it joins the study
        out_a = first.communicate(timeout=1200)[0]
        out_c = third.communicate(timeout=1200)[0]
        assert first.returncode == 0, out_a[-5000:]
        assert third.returncode == 0, out_c[-5000:]

        study = load(url, "shared")
        trials = study.get_trials()
        states = {t.number: t.state.name for t in trials}
        assert states[killed] == "FAIL", (states, "".join(out_b)[-2000:])
        finished = [t for t in trials if t.state.name == "COMPLETE"]
        assert len(finished) == 3, states  # the study's budget, not a worker's
        retry = [t for t in finished if t.system_attrs.get("failed_trial") == killed]
        assert len(retry) == 1 and retry[0].params == trials[killed].params, "the lost trial ran again, once"
        assert "storage is unreachable" in out_a + out_c, "the restart was seen, waited out"
        workers = {t.user_attrs["worker"] for t in finished}
        assert len(workers) == 2, workers  # both live workers took trials: the restarted one joined

        # Every finished trial is an experiment on the git remote; the killed one never finished, and none twice.
        names = [t.user_attrs["experiment"] for t in finished]
        assert len(set(names)) == 3
        on_remote = remote_experiments(origin)
        assert set(names) <= set(on_remote), (names, on_remote)
        assert f"shared-{killed}" not in on_remote
        assert all(on_remote[t.user_attrs["experiment"]] == t.user_attrs["commit"] for t in finished)
        for c in (p, b):
            assert (c / "params.yaml").read_text() + (c / "dvc.lock").read_text() == before[c]

        # A third machine: the report from the study's storage, the experiments pulled with their outputs.
        c = clone(origin, tmp_path / "machine-c", s3)
        report = subprocess.run([sys.executable, "-m", "tools.tune", "report", "--pull", "origin"], cwd=c,
                                capture_output=True, text=True,
                                env=dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}"
                                                          f"{os.environ['PATH']}"))
        assert report.returncode == 0, report.stderr[-3000:]
        for t in finished:
            name = t.user_attrs["experiment"]
            shown = run(["git", "show", f"{on_remote[name]}:metrics/evaluate.json"], c).stdout
            assert json.loads(shown)["val_loss"] == t.values[0]
            lock = yaml.safe_load(run(["git", "show", f"{on_remote[name]}:dvc.lock"], c).stdout)
            adapter = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "models/adapter")
            listing = json.loads((c / ".dvc/cache/files/md5" / adapter[:2] / adapter[2:]).read_text())
            for entry in listing:  # the adapter's files, pulled into the third clone's cache
                assert (c / ".dvc/cache/files/md5" / entry["md5"][:2] / entry["md5"][2:]).exists(), entry
        result = json.loads((c / "reports/tune/shared.json").read_text())
        best = min(finished, key=lambda t: t.values[0])
        assert result["best"]["experiment"] == best.user_attrs["experiment"]
        md = (c / "reports/tune/shared.md").read_text()
        assert f"dvc exp apply {best.user_attrs['experiment']}" in md
        assert all(t.user_attrs["commit"][:7] in md for t in finished)
        run(["dvc", "exp", "apply", best.user_attrs["experiment"]], c)
        assert json.loads((c / "models/adapter/adapter_config.json").read_text())["r"] == best.params["lora.r"]


@pytest.mark.fault("The S3 remote down when a trial finishes", sees="`tune: push of <experiment> failed (...); kept, "
                   "to push later`; the worker goes on, and pushes it once the remote is back", lost="nothing")
def test_a_push_that_fails_is_kept_and_pushed_later(tiny_project, tmp_path):
    p, origin = tiny_project, tmp_path / "origin.git"
    with S3Server(tmp_path / "s3") as s3:
        publish(p, origin)
        s3.configure_dvc(p)
        (p / "tune.yaml").write_text(STUDY.format(study="offline", storage="null", objective="val_loss", trials=2,
                                                  startup=2, pruner="none", push="origin"))
        commit(p, "a study whose trials are pushed")
        run(["dvc", "push"], p)
        s3.stop()
        proc = worker(p)
        out = []
        for line in proc.stdout:
            out.append(line)
            if line.startswith("tune: push of offline-0 failed"):
                s3.start()  # back while the second trial runs
                break
        out.append(proc.communicate(timeout=900)[0])
        assert proc.returncode == 0, "".join(out)[-3000:]
        assert "tune: pushed offline-0 to origin" in "".join(out)
        assert {"offline-0", "offline-1"} <= set(remote_experiments(origin))
        c = clone(origin, tmp_path / "teammate", s3)
        run(["dvc", "exp", "pull", "origin", "offline-0"], c)  # its outputs reached the DVC remote too
        run(["dvc", "exp", "apply", "offline-0"], c)
        assert (c / "models/adapter/adapter_model.safetensors").exists()


@pytest.mark.fault("A trial behind the others at the same step (median pruner)",
                   sees="training stops there; the trial is PRUNED, its experiment and val curve kept",
                   lost="the rest of a hopeless run, by design")
def test_a_hopeless_trial_is_pruned_mid_run_and_kept_with_its_curve(tiny_project):
    from tools.tune import load_config, open_study

    p = tiny_project
    (p / "tune.yaml").write_text(STUDY.format(study="pruned", storage="null", objective="val_accuracy", trials=2,
                                              startup=1, pruner="median", push="null"))
    cwd = os.getcwd()
    os.chdir(p)
    try:  # a rate that learns, then one too small to move the val loss: the second is behind from its first step
        study = open_study(load_config("tune.yaml"))
        study.enqueue_trial({"train.learning_rate": 1e-2, "lora.r": 4})
        study.enqueue_trial({"train.learning_rate": 1e-4, "lora.r": 2})
    finally:
        os.chdir(cwd)
    proc = worker(p)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-4000:]

    import optuna

    trials = optuna.load_study(study_name="pruned", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(p / "reports/tune/pruned.jsonl")))).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"], out[-3000:]
    good, hopeless = trials
    step = max(hopeless.intermediate_values)
    # Pruned where its val loss (reported negated: the objective is maximized) fell behind the first trial's.
    assert hopeless.intermediate_values[step] < good.intermediate_values[step]
    assert step < max(good.intermediate_values), "stopped before the end of its run"
    refs = {line.split()[1].rsplit("/", 1)[1]: line.split()[0] for line in run(
        ["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"], p).stdout.splitlines()}

    def committed(name, file):  # a stage's figures as the experiment's commit has them
        return json.loads(run(["git", "show", f"{refs[name]}:metrics/{file}.json"], p).stdout)

    ref = refs["pruned-1"]
    assert committed("pruned-1", "train")["pruned"] is True
    assert committed("pruned-1", "train")["steps"] == step
    assert "val_accuracy" in committed("pruned-1", "evaluate")
    curve = run(["git", "show", f"{ref}:metrics/live/plots/metrics/eval/loss.tsv"], p).stdout.splitlines()
    steps = [int(dict(zip(curve[0].split("\t"), line.split("\t")))["step"]) for line in curve[1:]]
    assert steps[-1] == step, curve  # its val curve, up to where it was stopped
    assert good.values[0] == committed("pruned-0", "evaluate")["val_accuracy"]

"""A training run that is a trial of a study (`train.trial`, set by the tune worker): at each
evaluation it reports the val loss to its Optuna trial, and stops when the study's pruner says the
trial cannot catch up with the others. The worker passes the study's storage in QLORA_TUNE_STORAGE
(a database URL, or the path of a journal file), so no password is written into params.yaml.
"""

import os
import time

STORAGE_ENV = "QLORA_TUNE_STORAGE"
PRUNERS = ("none", "median", "halving")


def storage_errors():
    """What a study storage raises while its database is down or restarting."""
    import sqlalchemy.exc

    from optuna.exceptions import StorageInternalError  # what Optuna raises for a failed database session

    return (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, StorageInternalError, ConnectionError)


def retrying(call, what, wait_minutes=30, say=print):
    """`call()`, retried while the study's storage is unreachable (a database restarted, a network cut):
    the caller waits and goes on, up to `wait_minutes`, saying so once a minute at most."""
    errors, start, delay, said = storage_errors(), time.time(), 1.0, 0.0
    while True:
        try:
            return call()
        except errors as err:
            waited = time.time() - start
            if waited > 60 * wait_minutes:
                raise
            if waited - said >= 60 or not said:
                say(f"tune: the study's storage is unreachable ({what}: {str(err).splitlines()[0][:160]}); "
                    f"retrying for up to {wait_minutes} minutes")
                said = waited or 1e-9
            time.sleep(delay)
            delay = min(2 * delay, 15.0)


def open_storage(url, heartbeat_seconds=None):
    """A study storage by its URL: a database (sqlalchemy URL) with Optuna's heartbeat, or a journal file."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    warnings.simplefilter("ignore", ExperimentalWarning)  # the heartbeat and its retry callback, stable for years

    if "://" not in url:
        return JournalStorage(JournalFileBackend(url))
    retry = RetryHeartbeatStaleTrialCallback(max_retry=3)  # a stale trial's params, enqueued to run again
    beat = dict(heartbeat_interval=heartbeat_seconds, grace_period=2 * heartbeat_seconds,
                heartbeat_stale_trial_callback=retry) if heartbeat_seconds else {}

    def connect():
        import sqlalchemy.exc

        for attempt in range(5):
            try:  # pool_pre_ping: a connection the database dropped (it restarted) is replaced, not used and failed
                return RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **beat)
            except sqlalchemy.exc.IntegrityError:  # another worker creating the tables of a new database
                time.sleep(1 + attempt)
        return RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **beat)

    return retrying(connect, "connect", say=lambda text: print(text, flush=True))


def pruner(spec):
    """The study's pruner from its spec (kept in the study's user attributes by the worker)."""
    import optuna

    kind = spec.get("kind", "none")
    if kind == "median":  # worse than the median of earlier trials at the same step; never at step 0
        return optuna.pruners.MedianPruner(n_startup_trials=spec.get("startup_trials", 2), n_warmup_steps=1)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def pruning_callback(trial_name):
    """A TrainerCallback reporting each val loss to trial `trial_name` ("<study>/<number>") and stopping
    the run when the study's pruner prunes it; its `pruned_at` is the step, or None."""
    import optuna
    from transformers import TrainerCallback

    study_name, _, number = trial_name.rpartition("/")
    url = os.environ.get(STORAGE_ENV)
    if not url:
        raise SystemExit(f"train: train.trial is {trial_name!r} but {STORAGE_ENV} is not set: train.trial is "
                         f"set by the tune worker (python -m tools.tune), which passes the study's storage; "
                         f"set train.trial: null to train outside a study")
    storage = open_storage(url)
    study = retrying(lambda: optuna.load_study(study_name=study_name, storage=storage), "load the study")
    study.pruner = pruner(study.user_attrs.get("pruner", {}))
    frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == int(number)), None)
    if frozen is None:
        raise SystemExit(f"train: train.trial {trial_name!r}: study {study_name!r} has no trial {number}")
    trial = optuna.trial.Trial(study, frozen._trial_id)
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1

    class Pruning(TrainerCallback):
        pruned_at = None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            from optuna.exceptions import UpdateFinishedTrialError

            try:  # the val loss, as the objective's direction reads it (negated for a maximized val metric)
                retrying(lambda: trial.report(sign * metrics["eval_loss"], state.global_step), "report the val loss")
            except UpdateFinishedTrialError:
                raise SystemExit(f"train: trial {trial_name} was marked failed by another worker (its heartbeat "
                                 f"lapsed); a live worker runs its params again, so this run stops") from None
            if retrying(trial.should_prune, "ask the pruner"):
                self.pruned_at = state.global_step
                control.should_training_stop = True

    return Pruning()

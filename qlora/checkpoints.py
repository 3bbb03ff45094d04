"""Resumable training: checkpoints keyed by a fingerprint of the run, outside DVC's outputs.

DVC 3 has no checkpoints of its own, and a folder tracked as a stage output is deleted
before the stage runs and reset by `dvc exp run`; so checkpoints live in an untracked,
git-ignored folder (`paths.checkpoints`), one subfolder per run fingerprint:

    .checkpoints/<fingerprint>/checkpoint-<step>/   the Trainer's checkpoint (adapter,
                                                   optimizer, scheduler, RNG, trainer_state.json)
                                                   + live/, the dvclive curves up to that step

A checkpoint counts as complete once both trainer_state.json and live/ are in it (the
Trainer writes its state last; live/ is moved in whole). The fingerprint covers everything
that decides the run's result: the lora and train params and the content of the tokenized
data and the quantized model, so a run never resumes another's checkpoint.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

# Params that change what is logged or how often it is saved, not the trained weights.
NOT_IN_FINGERPRINT = {"logging_steps", "checkpoint_steps"}


def _digest_files(folder, h):
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode())
            with open(path, "rb") as f:
                h.update(hashlib.file_digest(f, "md5").digest())


def fingerprint(p):
    """16 hex digits naming the run: params of lora and train, the data, the model."""
    h = hashlib.sha256()
    h.update(json.dumps({"lora": vars(p.lora),
                         "train": {k: v for k, v in vars(p.train).items() if k not in NOT_IN_FINGERPRINT}},
                        sort_keys=True, default=str).encode())
    _digest_files(p.paths.tokenized, h)
    _digest_files(p.paths.quantized, h)
    return h.hexdigest()[:16]


def step_of(checkpoint):
    return int(re.fullmatch(r"checkpoint-(\d+)", Path(checkpoint).name).group(1))


def newest_complete(run_dir):
    """The checkpoint to resume from, or None; incomplete ones (killed mid-save) are skipped."""
    found = [c for c in Path(run_dir).glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", c.name) and (c / "trainer_state.json").exists() and (c / "live").is_dir()]
    return max(found, key=step_of, default=None)


def live_snapshot_callback(live_dir):
    """Copies the dvclive folder into each checkpoint the Trainer saves, so that a resumed run
    continues the curves from exactly that step (no lost and no duplicate steps)."""
    from transformers import TrainerCallback

    class LiveSnapshot(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not checkpoint.is_dir():
                return
            partial = checkpoint / "live.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(live_dir, partial)
            partial.rename(checkpoint / "live")

    return LiveSnapshot()


def restore_live(checkpoint, live_dir):
    """Put back the curves as they were when `checkpoint` was saved."""
    shutil.rmtree(live_dir, ignore_errors=True)
    shutil.copytree(Path(checkpoint) / "live", live_dir)

"""Each measured record of a results file (a variant, a scale, a tool's run, ...) carries its own
provenance: the machine, library versions, commit and date of the run that measured it, and the
command that measured it. A file whose rows come from several runs (`--only`, `--scales`) then
says which run each row came from.

Each benchmark script declares in `CODE` the project files whose behaviour its figures depend on
(the lists below name the shared ones). `python -m tools.docs` marks a row stale once any of them
differs, comments and docstrings aside, from what it was at the row's commit, and
`python -m tools.docs --stale` lists those rows with the command that refreshes each.
"""

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What makes the pipeline's outputs a benchmark reads (data/tokenized, models/quantized).
UPSTREAM = ["stages/base.py", "stages/prepare.py", "stages/tokenize.py", "stages/quantize.py", "params.yaml"]
# The train stage and what it imports that shapes a step (outputs, console and trial only write or log).
TRAIN_STAGE = ["stages/train.py", "qlora/models.py", "qlora/precision.py", "qlora/lean.py", "qlora/params.py", "qlora/cost.py",
               "qlora/cores.py", "qlora/splits.py", "qlora/checkpoints.py"]
# The whole pipeline as `dvc repro` runs it.
PIPELINE = ["dvc.yaml", "params.yaml", "stages/validate.py", "stages/base.py", "stages/prepare.py",
            "stages/tokenize.py", "stages/quantize.py", "stages/train.py", "stages/evaluate_base.py",
            "stages/evaluate.py", "stages/export.py", "qlora/checkpoints.py", "qlora/gguf_convert.py", "qlora/console.py", "qlora/cores.py",
            "qlora/cost.py", "qlora/lean.py", "qlora/models.py", "qlora/outputs.py", "qlora/params.py", "qlora/precision.py",
            "qlora/scoring.py", "qlora/splits.py", "qlora/tasks.py", "qlora/trial.py", "qlora/evaluate_modules/accuracy/accuracy.py",
            "qlora/evaluate_modules/f1/f1.py"]


def command(argv=None):
    """The command line that ran this script, as typed in the project folder."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    if script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    return shlex.join([".venv/bin/python", str(script), *argv[1:]])


def kept(results, rows):
    """The rows (`results[rows]`) of an earlier results file, each with its own provenance: a row from
    before rows carried one gets its file's."""
    whole = {k: results[k] for k in ("machine", "versions", "commit", "date") if k in results}
    return {name: row if "provenance" in row else dict(row, provenance=whole) for name, row in results[rows].items()}


def stamp(record, cwd=None, command_line=None):
    """`record` with its own `provenance`: this run's machine, versions, commit and date, and the
    command that measured it (`command_line`, when a row is refreshed by a narrower command)."""
    from qlora.outputs import provenance

    return dict(record, provenance=dict(provenance(cwd), command=command_line or command()))

"""Check params.yaml and the inputs before any other stage runs, so that a bad value costs nothing.

DVC deletes a stage's outputs just before it runs the stage. Every other stage depends
on this one, so DVC runs it first whenever params.yaml, the raw data or this code
change. It reads the whole params file, the raw data with the prepare stage's own checks
(fields, malformed rows, labels, empty splits) and whether the base model can be found,
and a bad value stops the run here, before any stage has removed its last good outputs.
Its output (`persist`, never deleted by DVC) holds nothing that changes while the inputs
are valid, so a valid change reruns only the stages that read what changed.
"""

from pathlib import Path

from qlora.outputs import log, write_json
from qlora.params import ParamsError, load_params
from stages.base import check_source
from stages.prepare import make_splits, read_raw

PARAMS = ["paths", "data", "base", "tokenize", "quantize", "lora", "train", "evaluate", "export"]
VALIDATED = "validated.json"  # under paths.metrics; every stage depends on it
ACCELERATE = Path(__file__).resolve().parents[1] / "accelerate"


def main():
    p = load_params(PARAMS)  # the whole file: unknown keys, types, ranges, allowed values
    check_source(p.base)
    t = p.train
    if t.processes > 1 and not (ACCELERATE / f"{t.distributed}.yaml").exists():
        raise ParamsError(f"params.yaml: train.distributed is {t.distributed!r}, but accelerate/{t.distributed}.yaml "
                          f"does not exist (there: {', '.join(sorted(f.stem for f in ACCELERATE.glob('*.yaml')))})")
    if p.data.hub_id:
        log(f"data.hub_id {p.data.hub_id}: the hub data is checked by the prepare stage")
    else:
        splits, _, _ = make_splits(read_raw(p.paths.raw), p.data, p.paths.raw)
        log(f"{p.paths.raw}: " + ", ".join(f"{name} {len(rows)}" for name, rows in splits.items()))
    write_json(Path(p.paths.metrics) / VALIDATED, {"params.yaml": "valid", "inputs": "readable"})


if __name__ == "__main__":
    main()

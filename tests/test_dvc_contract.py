"""dvc.yaml says exactly what each stage's code reads: its params keys and its project modules.

Without this, a stage could read a param or import a module that dvc.yaml does not
list, and DVC would skip it when that changed (a stale result that looks fresh).
"""

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from qlora.params import PARAMS_FILE, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
DVC = DVC_YAML["stages"]
PARAMS = yaml.safe_load((ROOT / PARAMS_FILE).read_text())
# A module that loads non-Python project files at run time, and those files: every
# `evaluate` module folder the scorer loads.
RUNTIME_LOADS = {"qlora/tasks.py": {f"qlora/evaluate_modules/{m.name}"
                                      for m in (ROOT / "qlora/evaluate_modules").iterdir() if m.is_dir()},
                 "stages/export.py": {"qlora/gguf_convert.py"}}  # run as `python -m qlora.gguf_convert`


def project_imports(path, seen=None):
    """The project's .py files that `path` imports, transitively (relative to the repo root)."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module in ("qlora", "stages"):  # from qlora import cores
            names += [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in ("qlora", "stages"):
                dep = name.replace(".", "/") + ".py"
                if dep not in seen and (ROOT / dep).exists():
                    seen.add(dep)
                    project_imports(dep, seen)
    return seen


def render(value):
    """dvc.yaml's ${paths.x} templating, for comparing deps to code."""
    for key, path in PARAMS["paths"].items():
        value = value.replace("${paths.%s}" % key, path)
    return value


@pytest.mark.parametrize("stage", sorted(DVC))
def test_params_declared_in_dvc_yaml_match_the_stage_module(stage):
    module = importlib.import_module(f"stages.{stage}")
    assert sorted(DVC[stage]["params"]) == sorted(module.PARAMS)
    assert DVC[stage]["cmd"] == f"python -m stages.{stage}"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_code_deps_are_the_module_and_everything_it_imports(stage):
    own = f"stages/{stage}.py"
    code = {own} | project_imports(own)
    code |= {f for m in code if m in RUNTIME_LOADS for f in RUNTIME_LOADS[m]}
    declared = {render(d) for d in DVC[stage]["deps"]}
    declared_code = {d for d in declared if d.startswith(("stages/", "qlora/"))}
    assert declared_code == code


def test_every_path_param_is_used_by_a_stage():
    declared = {k for stage in DVC.values() for k in stage["params"]}
    assert {f"paths.{k}" for k in PARAMS["paths"]} <= declared


def test_a_stage_cannot_read_an_undeclared_key():
    view = load_params(["lora", "paths.adapter"], ROOT / PARAMS_FILE)
    assert view.lora.r == parse_params(ROOT / PARAMS_FILE).lora.r
    assert view.paths.adapter
    with pytest.raises(AttributeError, match="train is read but not declared"):
        view.train.seed
    with pytest.raises(AttributeError, match="paths.base is read but not declared"):
        view.paths.base


def test_plots_read_the_curves_the_train_stage_writes():
    """Top-level plots name files (no templating there): they must be where dvclive writes, or outputs
    of the evaluate stage (the truth-vs-prediction scatter)."""
    from stages import train

    live = f"{PARAMS['paths']['metrics']}/{train.LIVE_DIR}/"
    train_outs = {render(next(iter(o)) if isinstance(o, dict) else o) for o in DVC["train"]["outs"]}
    assert live.rstrip("/") in train_outs
    evaluate_outs = {render(next(iter(o)) if isinstance(o, dict) else o) for o in DVC["evaluate"]["outs"]}
    files = {f for plot in DVC_YAML["plots"] for spec in plot.values() for f in spec["y"]}
    assert files and all(f.startswith(live + "plots/metrics/") or f in evaluate_outs for f in files)
    assert live + train.VAL_CURVE in files, "the val curve plotted is the one copied into the adapter and scored"


def test_validate_reads_all_of_params_and_runs_before_every_stage():
    """A bad value must stop the run before any stage deletes its outputs (stages/validate.py)."""
    from stages.validate import VALIDATED

    assert set(DVC["validate"]["params"]) == set(PARAMS), "every section of params.yaml"
    validate_out = next(iter(DVC["validate"]["outs"][0]))
    assert validate_out == "${paths.metrics}/" + VALIDATED and DVC["validate"]["outs"][0][validate_out]["persist"]
    for name, stage in DVC.items():
        assert name == "validate" or validate_out in stage["deps"], name


def test_no_stage_or_library_module_imports_the_tools():
    """tools/ (reports, docs renderer, search, test servers) runs beside the pipeline: a stage that
    imported it would depend on code its dvc.yaml entry cannot list without rerunning on every report change."""
    offenders = []
    for path in sorted([*ROOT.glob("stages/*.py"), *ROOT.glob("qlora/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "tools"]
    assert offenders == []

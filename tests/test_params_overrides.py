"""`dvc exp run -S key=value` rewrites params.yaml through DVC's apply_overrides (a ruamel round trip).

Overrides applied one after another must leave a file that parses, with each value as set, the
others as they were and every comment kept. ruamel breaks two layouts once a list has been
rewritten (every -S rewrites all lists in block style): an end-of-line comment on a list key
joins two lines when the list becomes [] ("base: source: bundled"), and a comment line right
after a list is attached to its last item and dropped at the next -S. So a list key carries its
explanation on the lines above it, and no comment line follows a list.
"""

import dataclasses
import shutil

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from conftest import ROOT
from qlora.params import parse_params

# (-S as the shell passes it, the key, the value parse_params must read back)
OVERRIDES = [
    ("lora.r=16", "lora.r", 16),  # first, so that every list below starts in block style
    ("data.labels=[a,b]", "data.labels", ["a", "b"]),
    ("lora.target_modules=[q_proj,v_proj]", "lora.target_modules", ["q_proj", "v_proj"]),
    ("data.labels=[]", "data.labels", []),
    ("data.labels=[fonts,doc]", "data.labels", ["fonts", "doc"]),
    ("data.labels=[1,2,3]", "data.labels", ["1", "2", "3"]),
    ("data.max_per_label=null", "data.max_per_label", None),
    ("base.path='/models/my model'", "base.path", "/models/my model"),
    ("base.path=null", "base.path", None),
    ("data.max_per_label=30", "data.max_per_label", 30),
    ("train.learning_rate=1e-4", "train.learning_rate", 1e-4),
    ("lora.dropout=0.1", "lora.dropout", 0.1),
    ("quantize.double_quant=false", "quantize.double_quant", False),
    ("train.group_by_length=true", "train.group_by_length", True),
    ("tokenize.system_prompt='You sort packages, briefly.'", "tokenize.system_prompt", "You sort packages, briefly."),
    # The shell passes `\n` as a backslash and an n; the file keeps them so, parse_params reads a new line.
    ("tokenize.system_prompt='Line one\\nLine two'", "tokenize.system_prompt", "Line one\nLine two"),
    ("data.prompt_template='Q: {description}\\nA:'", "data.prompt_template", "Q: {description}\nA:"),
    ("data.prompt_template='Q: {package}\nA:'", "data.prompt_template", "Q: {package}\nA:"),  # a real new line
    ("tokenize.system_prompt=null", "tokenize.system_prompt", None),
    ("paths.raw=data/raw/other.jsonl", "paths.raw", "data/raw/other.jsonl"),
    ("evaluate.max_new_tokens=32", "evaluate.max_new_tokens", 32),
    ("evaluate.max_new_tokens=auto", "evaluate.max_new_tokens", "auto"),
    ("train.gradient_checkpointing_every=2", "train.gradient_checkpointing_every", 2),
    ("evaluate.task=generation", "evaluate.task", "generation"),
    ("export.metric_tolerance=0.05", "export.metric_tolerance", 0.05),  # the last key of the file
    ("data.labels=[x]", "data.labels", ["x"]),
]


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def comments(path):
    return sorted(line[line.index("#"):] for line in path.read_text().splitlines() if "#" in line)


def test_overrides_one_after_another_read_back_as_set(params_file):
    expected = dataclasses.asdict(parse_params(params_file))
    shipped_comments = comments(params_file)
    for override, key, value in OVERRIDES:
        apply_overrides(params_file, [override])
        section, name = key.split(".")
        expected[section][name] = value
        assert dataclasses.asdict(parse_params(params_file)) == expected, f"after -S {override}"
        assert comments(params_file) == shipped_comments, f"after -S {override}"


LIST_KEYS = [f"{section}.{name}" for section, keys in yaml.safe_load((ROOT / "params.yaml").read_text()).items()
             for name, value in keys.items() if isinstance(value, list)]


@pytest.mark.parametrize("key", LIST_KEYS)
def test_every_list_can_be_emptied_and_refilled(params_file, key):
    # Also for keys parse_params refuses empty (lora.target_modules): the file itself must survive.
    expected = yaml.safe_load(params_file.read_text())
    shipped_comments = comments(params_file)
    section, name = key.split(".")
    apply_overrides(params_file, ["train.seed=7"])  # rewrites every list in block style
    expected["train"]["seed"] = 7
    for value in ([], ["a", "b"]):
        apply_overrides(params_file, [f"{key}=[{','.join(value)}]"])
        expected[section][name] = value
        assert yaml.safe_load(params_file.read_text()) == expected, f"after -S {key}={value}"
        assert comments(params_file) == shipped_comments, f"after -S {key}={value}"


def test_the_shipped_values_keep_their_meaning():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # Real new lines in the file itself, not the two characters parse_params would turn into one.
    assert raw["data"]["prompt_template"] == (
        "Debian section of this package, one of: {labels}.\nPackage: {package}\nDescription: {description}")
    assert raw["data"]["labels"] == ["fonts", "doc", "python", "perl", "libdevel", "games", "science", "net"]
    assert raw["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert raw["tokenize"]["system_prompt"] == "You sort Debian packages."
    assert raw["data"]["hub_id"] is None and raw["base"]["path"] is None
    assert parse_params(ROOT / "params.yaml").data.prompt_template == raw["data"]["prompt_template"]

"""params.yaml is validated before any heavy work; errors name the file, key and value."""

import re
import shutil

import pytest

from conftest import ROOT, set_params
from qlora.params import ParamsError, parse_params


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def test_the_shipped_params_are_valid():
    p = parse_params(ROOT / "params.yaml")
    assert p.quantize.bits == 4 and p.lora.r > 0


@pytest.mark.parametrize("key,value,message", [
    ("lora.r", 0, "lora.r must be a positive integer, got 0"),
    ("lora.r", "abc", "lora.r must be an integer, got 'abc'"),
    ("lora.r", 8.5, "lora.r must be an integer, got 8.5"),
    ("lora.dropout", 1.0, "lora.dropout must be in [0, 1), got 1.0"),
    ("lora.dropout", -0.1, "lora.dropout must be in [0, 1), got -0.1"),
    ("quantize.bits", 3, "quantize.bits must be one of 4, 8, 16, got 3"),
    ("quantize.quant_type", "nf3", "quantize.quant_type must be one of nf4, fp4, got 'nf3'"),
    ("quantize.double_quant", "yes", "quantize.double_quant must be true or false, got 'yes'"),
    ("quantize.compute_dtype", "int4", "quantize.compute_dtype must be one of auto, bfloat16, float16, float32"),
    ("train.learning_rate", "fast", "train.learning_rate must be a number, got 'fast'"),
    ("train.optimizer", "adam", "train.optimizer must be one of"),
    ("lora.target_modules", [], "lora.target_modules must be a non-empty list"),
    ("data.test_fraction", 0.9, "data.test_fraction must be small enough to leave training data"),
    ("base.source", "s3", "base.source must be one of bundled, local, gguf, hub, got 's3'"),
    ("tokenize.template", "chatml", "tokenize.template must be one of auto, chat, plain, got 'chatml'"),
    ("lora.target_modules", "all", "lora.target_modules must be a non-empty list of module names, or all-linear"),
    ("export.dtype", "int8", "export.dtype must be one of auto, bfloat16, float16, float32, got 'int8'"),
    ("export.check_examples", 0, "export.check_examples must be a positive integer, got 0"),
])
def test_bad_value_names_file_key_and_value(params_file, key, value, message):
    set_params(params_file, {key: value})
    with pytest.raises(ParamsError) as err:
        parse_params(params_file)
    assert str(params_file) in str(err.value) and message in str(err.value)


def test_unknown_key_is_refused(params_file):
    set_params(params_file, {"lora.rank": 8})
    with pytest.raises(ParamsError, match=r"unknown key lora\.rank"):
        parse_params(params_file)


def test_missing_key_is_refused(params_file):
    params_file.write_text(params_file.read_text().replace("  r: 8 ", "  # r removed "))
    with pytest.raises(ParamsError, match=r"missing key lora\.r"):
        parse_params(params_file)


def test_exponent_without_dot_is_a_number(params_file):
    # `dvc exp run -S train.learning_rate=1e-4` writes 1e-4, which PyYAML reads as a string.
    text = re.sub(r"learning_rate: \S+", "learning_rate: 1e-4", params_file.read_text())
    assert "learning_rate: 1e-4" in text
    params_file.write_text(text)
    assert parse_params(params_file).train.learning_rate == 1e-4


def test_gguf_source_requires_a_gguf_file(params_file):
    set_params(params_file, {"base.source": "gguf", "base.path": "models/my-model"})
    with pytest.raises(ParamsError, match="base.path must be a .gguf file when base.source is gguf, got 'models/my-model'"):
        parse_params(params_file)


def test_target_modules_all_linear_is_a_word_not_a_list(params_file):
    set_params(params_file, {"lora.target_modules": "all-linear"})
    assert parse_params(params_file).lora.target_modules == "all-linear"


def test_hub_source_requires_a_pinned_revision(params_file):
    set_params(params_file, {"base.source": "hub", "base.revision": None})
    with pytest.raises(ParamsError, match="base.revision must be a pinned commit hash"):
        parse_params(params_file)


def test_scheduler_and_optimizer_choices_are_transformers_own():
    # Spelled out in qlora/params.py so that the light stages need not import torch; this keeps
    # them equal to the installed transformers' enums.
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from qlora.params import OPTIMIZERS, SCHEDULERS

    assert set(SCHEDULERS) == {s.value for s in SchedulerType}
    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}


@pytest.mark.parametrize("key,value,message", [
    ("lora.use_dora", "yes", "lora.use_dora must be true or false, got 'yes'"),
    ("lora.init", "xavier", "lora.init must be one of kaiming, gaussian, pissa, olora, loftq, eva, got 'xavier'"),
    ("lora.modules_to_save", "lm_head", "lora.modules_to_save must be a list of module names (may be empty)"),
    ("train.max_steps", 0, "train.max_steps must be -1 or a positive integer, got 0"),
    ("evaluate.max_new_tokens", "many", "evaluate.max_new_tokens must be auto or a positive integer, got 'many'"),
    ("train.gradient_checkpointing", "yes", "train.gradient_checkpointing must be auto, true or false, got 'yes'"),
    ("train.gradient_checkpointing_every", 0,
     "train.gradient_checkpointing_every must be auto or a positive integer, got 0"),
    ("data.max_per_label", 0, "data.max_per_label must be a positive integer or null, got 0"),
    ("train.lr_scheduler", "cosine_wiggle", "train.lr_scheduler must be one of linear, cosine"),
])
def test_new_and_union_keys_name_key_and_value(params_file, key, value, message):
    set_params(params_file, {key: value})
    with pytest.raises(ParamsError) as err:
        parse_params(params_file)
    assert message in str(err.value)

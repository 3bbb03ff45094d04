"""Any model: other families than Llama, base models without a chat template, a .gguf file as the source.

Two tiny models built from a config go through the whole pipeline with real DVC:
- a Qwen2 base model written as a GGUF file by the test, without a chat template, read through
  `base.source: gguf` (the plain format, answers ending at the end-of-sequence token);
- a Gemma 3 in a local folder with Gemma's kind of chat template (no system role, turns ending
  with <end_of_turn>), with `lora.target_modules: all-linear`.
Then the format's own checks: the plain format, a chat template without a system role, and the
errors that name the file before any heavy work.
"""

import json

import pytest
from safetensors import safe_open

from conftest import (NO_SYSTEM_ROLE_TEMPLATE, TINY_OVERRIDES, locked_stages, make_project, repro, run, set_params,
                      tiny_family_model)

ALL = {"validate", "base", "prepare", "tokenize", "quantize", "train", "evaluate_base", "evaluate", "export"}


@pytest.fixture(scope="module")
def qwen2_project(tmp_path_factory, tiny_qwen2_gguf):
    project = make_project(tmp_path_factory.mktemp("qwen2") / "project",
                           {**TINY_OVERRIDES, "base.source": "gguf", "base.path": str(tiny_qwen2_gguf),
                            # its tokenizer (SmolLM2's vocabulary read as Qwen2's) is one llama.cpp's converter
                            # does not know; tests/test_gguf.py exports a base model without a chat template
                            "export.gguf": "none"})
    return project, repro(project)


@pytest.fixture(scope="module")
def gemma3_project(tmp_path_factory, tiny_gemma3_dir):
    project = make_project(tmp_path_factory.mktemp("gemma3") / "project",
                           {**TINY_OVERRIDES, "base.source": "local", "base.path": str(tiny_gemma3_dir),
                            "lora.target_modules": "all-linear",
                            "export.gguf": "none"})  # llama.cpp converts Gemma 3 from its tokenizer.model, absent here
    return project, repro(project)


def test_a_gguf_base_model_without_chat_template_runs_the_whole_pipeline(qwen2_project):
    from transformers import AutoConfig, AutoTokenizer

    p, ran = qwen2_project
    assert ran == ALL
    import torch
    from transformers import AutoModelForCausalLM

    written, read = tiny_family_model("qwen2", 49152), AutoModelForCausalLM.from_pretrained(p / "models/base")
    assert read.config.model_type == "qwen2"
    ids = torch.tensor([[1, 300, 4000, 20, 9]])
    torch.testing.assert_close(read(input_ids=ids).logits, written(input_ids=ids).logits, rtol=0, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(p / "models/tokenizer")
    assert not tokenizer.chat_template

    fmt = json.loads((p / "metrics/tokenize.json").read_text())
    assert fmt["template"] == "plain" and len(fmt["template_hash"]) == 12
    assert fmt["system_prompt"] == "first lines of the prompt"
    tokenized = json.loads((p / "data/tokenized/format.json").read_text())
    assert tokenized["stop_token_ids"] == [tokenizer.eos_token_id]

    import pandas as pd

    row = pd.read_parquet(p / "data/tokenized/train.parquet").iloc[0]
    prompt = tokenizer.decode(row["input_ids"][: row["prompt_length"]])
    assert prompt.startswith("You sort Debian packages.\n\n") and prompt.endswith("\n"), prompt
    answer = [t for t in row["labels"] if t != -100]
    assert answer[-1] == tokenizer.eos_token_id and tokenizer.decode(answer[:-1]) == row["completion"]
    assert all(t == -100 for t in row["labels"][: row["prompt_length"]]), "the prompt is masked"

    evaluation = json.loads((p / "metrics/evaluate.json").read_text())
    assert {"test_accuracy", "base_test_accuracy", "test_loss"} <= set(evaluation)
    assert json.loads((p / "metrics/export.json").read_text())["test_loss"] > 0
    assert not AutoTokenizer.from_pretrained(p / "models/export").chat_template, "exported as the base model was"
    assert AutoConfig.from_pretrained(p / "models/export").model_type == "qwen2"


def test_a_gemma3_model_with_all_linear_targets_runs_the_whole_pipeline(gemma3_project):
    p, ran = gemma3_project
    assert ran == ALL
    fmt = json.loads((p / "metrics/tokenize.json").read_text())
    assert fmt["template"] == "chat" and fmt["system_prompt"] == "folded into the first user turn"
    stops = json.loads((p / "data/tokenized/format.json").read_text())["stop_tokens"]
    assert "<end_of_turn>" in stops, "a chat answer ends at the end of its turn"
    with safe_open(p / "models/adapter/adapter_model.safetensors", "pt") as f:
        adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in f.keys()}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, \
        "all-linear: every linear layer but the output head"
    assert json.loads((p / "metrics/export.json").read_text())["merge_max_abs_diff"] < 1e-4


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_a_template_without_system_role_gets_the_system_prompt_in_the_first_user_turn(tokenizer):
    from stages.tokenize import Format, encode

    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = NO_SYSTEM_ROLE_TEMPLATE
    fmt = Format(tokenizer, "chat", "You sort Debian packages.")
    enc, messages = encode(fmt, [dict(role="user", content="Package: fonts-x")], "fonts", 256)
    assert messages == [dict(role="user", content="You sort Debian packages.\n\nPackage: fonts-x")]
    prompt = tokenizer.decode(enc["input_ids"][: enc["prompt_length"]])
    assert "You sort Debian packages.\n\nPackage: fonts-x" in prompt, "folded, not dropped"
    assert fmt.describe()["system_prompt"] == "folded into the first user turn"


def test_chat_template_answers_end_at_the_end_of_turn(tokenizer):
    from stages.tokenize import Format, encode

    fmt = Format(tokenizer, "chat", "You sort Debian packages.")
    enc, _ = encode(fmt, [dict(role="user", content="Package: fonts-x")], "fonts", 256)
    answer = [t for t in enc["labels"] if t != -100]
    assert tokenizer.decode(answer).startswith("fonts<|im_end|>")
    assert fmt.describe()["system_prompt"] == "system turn"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in fmt.describe()["stop_token_ids"]


def test_plain_format_writes_earlier_turns_with_their_roles(tokenizer):
    from stages.tokenize import Format, encode

    fmt = Format(tokenizer, "plain", None)
    turns = [dict(role="user", content="2+2?"), dict(role="assistant", content="4"), dict(role="user", content="3+3?")]
    enc, _ = encode(fmt, turns, "6", 256)
    assert tokenizer.decode(enc["input_ids"]) == "User: 2+2?\nAssistant: 4\nUser: 3+3?\nAssistant:\n6<|im_end|>"
    assert fmt.describe()["system_prompt"] == "none"


def test_chat_on_a_tokenizer_without_template_is_refused(tokenizer):
    from qlora.params import ParamsError
    from stages.tokenize import resolve_template

    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(ParamsError, match="tokenize.template is chat, but the tokenizer in paths.tokenizer has no chat"):
        resolve_template("chat", tokenizer)
    assert resolve_template("auto", tokenizer) == "plain"


def write_unsupported_gguf(path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "rwkv7")  # a family llama.cpp runs and transformers does not read
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("project", ["qwen2_project", "gemma3_project"])
def test_the_speed_levers_of_train_hold_for_other_families(project, request, monkeypatch):
    """The 4-bit layers of each family stay on the training path through an eval pass (as on a CPU
    with AVX512-BF16), and short examples train with eager attention (tests/test_speed_levers.py
    checks the fused LM head and attention per family)."""
    from conftest import as_on_a_trap_cpu, eval_pass_repacks
    from qlora.models import load_model

    p, _ = request.getfixturevalue(project)
    as_on_a_trap_cpu(monkeypatch)
    assert eval_pass_repacks(load_model(p / "models/quantized", "auto")) == []
    from qlora.models import device

    assert json.loads((p / "metrics/train.json").read_text())["attention"] == ("eager" if device() == "cpu" else "sdpa")


@pytest.mark.parametrize("kind,message", [
    ("missing", "is not a file"),
    ("not gguf", "is not a readable GGUF file"),
    ("unsupported", "holds a 'rwkv7' model, which transformers"),
])
def test_a_bad_gguf_file_is_named_before_any_stage_runs(tiny_project, tmp_path, kind, message):
    p = tiny_project
    path = tmp_path / "model.gguf"
    if kind == "not gguf":
        path.write_bytes(b"<html>a login page saved instead of the model</html>")
    elif kind == "unsupported":
        write_unsupported_gguf(path)
    set_params(p / "params.yaml", {"base.source": "gguf", "base.path": str(path)})
    lock = locked_stages(p)
    result = run(["dvc", "repro"], p, check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and message in out and str(path) in out, out[-2000:]
    assert "Running stage 'base'" not in out and locked_stages(p) == lock


# ChatML as SmolLM2 writes it, but the generation prompt leaves out what the assistant turn starts with.
LEAKING_TEMPLATES = {
    "no assistant header in the generation prompt": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"),
    "empty reasoning tags before every past answer": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
        "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
}


@pytest.mark.parametrize("case", LEAKING_TEMPLATES)
def test_a_template_that_would_put_prompt_text_in_the_labels_stops_tokenize(tokenizer, case):
    from stages.tokenize import Format, encode

    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = LEAKING_TEMPLATES[case]
    with pytest.raises(SystemExit, match="before the answer in the assistant turn"):
        encode(Format(tokenizer, "chat", None), [dict(role="user", content="Package: fonts-x")], "fonts", 256)


def test_the_shipped_templates_pass_the_mask_audit(tokenizer):
    from stages.tokenize import Format, encode, labelled_share

    rows = [encode(Format(tokenizer, template, "You sort Debian packages."), [dict(role="user", content="Pkg: x")],
                   "fonts", 256)[0] for template in ("chat", "plain")]
    assert 0 < labelled_share(rows) < 0.5
    rows[0]["labels"][0] = rows[0]["input_ids"][0]  # a label on the first prompt token
    with pytest.raises(SystemExit, match="labels of 1 examples cover part of their prompt"):
        labelled_share(rows)


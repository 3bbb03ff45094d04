"""export.gguf: the merged model as a GGUF file (llama.cpp's converter), read back with transformers
and held to the adapter's scores; an Ollama Modelfile beside it; the pinned gguf module untouched."""

import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from conftest import ROOT, locked_stages, repro, run, set_params


def test_the_converter_does_not_replace_the_pinned_gguf_module():
    import gguf

    from stages.export import converter

    pinned = next(line.split("==")[1].split()[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
                  if line.startswith("gguf=="))
    assert version("gguf") == pinned
    assert Path(gguf.__file__).parent.parent.name == "site-packages"
    tool = converter()
    assert (tool / "gguf").is_dir(), "the converter ships a gguf module of its own"
    assert (tool / "gguf/constants.py").read_bytes() != (Path(gguf.__file__).parent / "constants.py").read_bytes()
    assert str(tool) not in sys.path and not any(str(tool) in p for p in sys.path)


def test_the_tiny_model_exports_a_gguf_that_scores_what_the_adapter_scored(reproduced_project):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from stages.export import gguf_metadata, load_gguf

    p = reproduced_project[0]
    export = json.loads((p / "metrics/export.json").read_text())
    path = p / "models/export/model.q8_0.gguf"
    assert export["gguf_file"] == path.name and path.stat().st_size > 0
    assert abs(export["gguf_test_loss"] - export["adapter_test_loss"]) <= 0.05
    assert export["gguf_chat_template"] is True
    meta = gguf_metadata(path)
    assert meta["architecture"] == "llama" and "Q8_0" in meta["tensor_types"]
    assert meta["chat_template"] == (p / "models/tokenizer/chat_template.jinja").read_text()

    # Read back, its logits are the merged model's up to 8-bit rounding, and not the weights of another file.
    model, tokenizer = load_gguf(path)
    merged = AutoModelForCausalLM.from_pretrained(p / "models/export", dtype=torch.float32)
    ids = torch.tensor([tokenizer("Package: fonts-dejavu")["input_ids"]])
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (a - b).abs().max() < 0.1 * b.abs().max()
    embedding = load_file(p / "models/export/model.safetensors")["model.embed_tokens.weight"].float()
    assert torch.allclose(model.get_input_embeddings().weight, embedding, atol=0.02 * embedding.abs().max().item())

    modelfile = (p / "models/export/Modelfile").read_text()
    assert "FROM ./model.q8_0.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    template = modelfile.split('TEMPLATE """')[1].split('"""')[0]
    assert template.count("{{ .Prompt }}") == 1 and template.endswith("<|im_start|>assistant\n")
    system = json.loads((p / "metrics/tokenize.json").read_text())
    assert "<|im_start|>system\n" in template, system


CORRUPTING_CONVERTER = '''
import runpy, sys
real = {real!r}
sys.path.insert(0, real)
out = sys.argv[sys.argv.index("--outfile") + 1]
sys.argv[0] = real + "/convert_hf_to_gguf.py"
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
from gguf import GGUFReader
reader = GGUFReader(out, "r+")
tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
tensor.data[...] = 0  # a file that loads and runs, with the wrong weights
'''


def test_a_corrupted_gguf_is_caught_and_nothing_is_exported(tiny_project, tmp_path):
    from stages.export import converter

    fake = tmp_path / "converter"
    fake.mkdir()
    (fake / "convert_hf_to_gguf.py").write_text(CORRUPTING_CONVERTER.format(real=str(converter())))
    lock = locked_stages(tiny_project)
    set_params(tiny_project / "params.yaml", {"export.loss_tolerance": 0.049})  # export reruns
    env = dict(os.environ, QLORA_GGUF_CONVERTER=str(fake))
    result = run_with_env(["dvc", "repro", "export"], tiny_project, env)
    assert result.returncode != 0
    assert "export: the GGUF file model.q8_0.gguf does not score what the adapter scored on test" in result.stderr, \
        result.stderr[-2000:]
    assert not (tiny_project / "models/export").exists(), "nothing exported"
    assert locked_stages(tiny_project)["export"] == lock["export"], "the failed export is not recorded"


def run_with_env(cmd, cwd, env):
    import subprocess

    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def test_export_gguf_none_writes_no_gguf(tiny_project):
    set_params(tiny_project / "params.yaml", {"export.gguf": "none"})
    assert repro(tiny_project) == {"validate", "export"}
    assert not list((tiny_project / "models/export").glob("*.gguf"))
    assert not (tiny_project / "models/export/Modelfile").exists()
    assert "gguf_file" not in json.loads((tiny_project / "metrics/export.json").read_text())


@pytest.fixture(scope="module")
def base_model_project(tmp_path_factory, tiny_model_dir):
    """A base model: the tiny Llama with a tokenizer that has no chat template."""
    import shutil

    from conftest import TINY_OVERRIDES, make_project

    model = tmp_path_factory.mktemp("base-model") / "tiny"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    project = make_project(tmp_path_factory.mktemp("base-model") / "project",
                           {**TINY_OVERRIDES, "base.source": "local", "base.path": str(model)})
    repro(project)
    return project


def test_a_base_model_without_a_chat_template_exports_a_gguf_without_one(base_model_project):
    from stages.export import gguf_metadata

    p = base_model_project
    assert json.loads((p / "metrics/tokenize.json").read_text())["template"] == "plain"
    export = json.loads((p / "metrics/export.json").read_text())
    assert export["gguf_chat_template"] is False
    assert abs(export["gguf_test_loss"] - export["adapter_test_loss"]) <= 0.05
    assert gguf_metadata(p / "models/export/model.q8_0.gguf")["chat_template"] is None
    modelfile = (p / "models/export/Modelfile").read_text()
    template = modelfile.split('TEMPLATE """')[1].split('"""')[0]
    assert template == "You sort Debian packages.\n\n{{ .Prompt }}\n", "the plain format: system, prompt, new line"


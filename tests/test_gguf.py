"""export.gguf: the merged model as a GGUF file (llama.cpp's converter), read back with transformers
and held to the adapter's scores; an Ollama Modelfile beside it; the pinned gguf module untouched."""

import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import ROOT, repro, run, set_params


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


@pytest.fixture(scope="module")
def gguf_project(tmp_path_factory, reproduced_project):
    """The reproduced tiny project exported again with a q8_0 GGUF (conftest.TINY_OVERRIDES writes none)."""
    from conftest import copy_project

    p = copy_project(reproduced_project[0], tmp_path_factory.mktemp("gguf") / "project")
    set_params(p / "params.yaml", {"export.gguf": "q8_0"})
    assert repro(p) == {"validate", "export"}
    return p


@pytest.fixture
def gguf_copy(tmp_path, gguf_project):
    """A private copy of gguf_project, for a test to change."""
    import shutil

    shutil.copytree(gguf_project, tmp_path / "project", symlinks=True)
    return tmp_path / "project"


def test_the_tiny_model_exports_a_gguf_that_scores_what_the_adapter_scored(gguf_project):
    from safetensors.torch import load_file

    from stages.export import gguf_metadata, load_gguf

    p = gguf_project
    export = json.loads((p / "metrics/export.json").read_text())
    path = p / "models/export/model.q8_0.gguf"
    assert export["gguf_file"] == path.name and path.stat().st_size > 0
    assert export["gguf_chat_template"] is True
    meta = gguf_metadata(path)
    assert meta["architecture"] == "llama" and "Q8_0" in meta["tensor_types"]
    assert meta["chat_template"] == (p / "models/tokenizer/chat_template.jinja").read_text()

    # Read back, every weight is the merged model's up to q8_0's rounding, and not the weights of another file.
    model, _, read = load_gguf(path)
    assert read == meta
    merged = load_file(p / "models/export/model.safetensors")
    assert beyond_q8_0_rounding(model, merged) == []

    modelfile = (p / "models/export/Modelfile").read_text()
    assert "FROM ./model.q8_0.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    template = modelfile.split('TEMPLATE """')[1].split('"""')[0]
    assert template.count("{{ .Prompt }}") == 1 and template.endswith("<|im_start|>assistant\n")
    system = json.loads((p / "metrics/tokenize.json").read_text())
    assert "<|im_start|>system\n" in template, system


def beyond_q8_0_rounding(model, merged):
    """The weights of a model read back from a q8_0 GGUF that differ from the merged model's by more than
    q8_0 allows: each block of 32 along a row is stored as int8 times one float16 scale, its absolute
    maximum over 127, so a weight is off by at most half that scale plus the scale's own float16
    rounding (times 127): 0.5 + 127 * 2**-11 < 0.57 scales. Tensors kept in float16 or float32 (norms)
    are within that too."""
    weights = dict(model.named_parameters())
    assert set(merged) <= set(weights), "the file holds every tensor of the merged model"
    off = []
    for name, reference in merged.items():
        reference, read = reference.float(), weights[name].detach().float()
        if reference.shape[-1] % 32:
            blocks, got = reference.reshape(-1, 1), read.reshape(-1, 1)  # no 32-blocks: only float16 rounding
            bound = blocks.abs() * 2 ** -10
        else:
            blocks, got = reference.reshape(-1, 32), read.reshape(-1, 32)
            bound = 0.57 * blocks.abs().amax(dim=1, keepdim=True) / 127
        if ((got - blocks).abs() > bound + 1e-7).any():
            off.append(name)
    return off


def test_a_gguf_a_few_percent_off_is_told_apart_from_q8_0_rounding(gguf_project, tmp_path):
    """The bound above catches what a subtle bug in a converter would do: one tensor's scales 2% off
    (its weights, so its logits, a few percent off), a file that loads and runs."""
    import shutil

    import numpy as np
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from stages.export import load_gguf

    p = gguf_project
    for name in ("config.json", "model.q8_0.gguf"):
        shutil.copy(p / "models/export" / name, tmp_path / name)
    reader = GGUFReader(tmp_path / "model.q8_0.gguf", "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert tensor.tensor_type.name == "Q8_0"
    blocks = tensor.data.reshape(-1, 34)  # a float16 scale, then 32 int8 weights
    scales = blocks[:, :2].copy().view(np.float16)
    blocks[:, :2] = (scales * np.float16(1.02)).view(np.uint8)
    del reader  # written through the memory map
    model, _, _ = load_gguf(tmp_path / "model.q8_0.gguf")
    assert beyond_q8_0_rounding(model, load_file(p / "models/export/model.safetensors")) == \
        ["model.layers.1.mlp.down_proj.weight"]


def test_an_export_that_misses_the_tolerance_by_a_little_is_refused_and_the_experiment_kept(gguf_copy):
    """export.loss_tolerance just under what the exported models differ by: the check refuses the model,
    names it and the figures, and exports nothing; the experiment is kept with its training and
    evaluation, and `dvc exp show` says the export was refused."""
    p = gguf_copy
    export = json.loads((p / "metrics/export.json").read_text())
    diffs = {"the merged model": abs(export["test_loss"] - export["adapter_test_loss"]),
             "the GGUF file model.q8_0.gguf": abs(export["gguf_test_loss"] - export["adapter_test_loss"])}
    what, diff = max(diffs.items(), key=lambda item: item[1])
    assert diff > 0, "no difference to fall short of"
    tolerance = round(0.9 * diff, 6)
    # bfloat16, as the project exported it (auto would try float32 next, tests/test_export.py)
    result = run(["dvc", "exp", "run", "-n", "strict", "-S", f"export.loss_tolerance={tolerance}",
                  "-S", "export.dtype=bfloat16"], p, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"export refused: {what} does not score what the adapter scored on test" in result.stderr
    shown = json.loads(run(["dvc", "exp", "show", "--json"], p).stdout)
    exp = next(e["revs"][0] for b in shown for e in b.get("experiments") or [] if e["name"] == "strict")
    assert exp["data"]["metrics"]["metrics/exported.json"]["data"] == {"export": "refused"}
    assert exp["data"]["metrics"]["metrics/scores.json"]["data"]["val_loss"] > 0, "its scores are kept"
    record = json.loads((p / "metrics/export.json").read_text())  # the workspace holds the experiment's outputs
    assert record["exported"] is False
    assert f"difference {diff:.4f}, export.loss_tolerance {tolerance}" in record["refused"]
    assert record["adapter_test_loss"] == export["adapter_test_loss"], "the figures it was refused on"
    assert [f.name for f in (p / "models/export").iterdir()] == ["README.md"], "no model is left as the export"
    assert "refused" in (p / "models/export/README.md").read_text()


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


def test_a_corrupted_gguf_is_caught_and_refused(gguf_copy, tmp_path):
    from stages.export import converter

    p = gguf_copy
    fake = tmp_path / "converter"
    fake.mkdir()
    (fake / "convert_hf_to_gguf.py").write_text(CORRUPTING_CONVERTER.format(real=str(converter())))
    set_params(p / "params.yaml", {"export.loss_tolerance": 0.049, "export.dtype": "bfloat16"})  # export reruns, once
    env = dict(os.environ, QLORA_GGUF_CONVERTER=str(fake))
    result = run_with_env(["dvc", "repro", "export"], p, env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "export refused: the GGUF file model.q8_0.gguf does not score what the adapter scored on test" in \
        result.stderr, result.stderr[-2000:]
    assert [f.name for f in (p / "models/export").iterdir()] == ["README.md"], "neither model nor file is left"
    assert json.loads((p / "metrics/exported.json").read_text()) == {"export": "refused"}


def run_with_env(cmd, cwd, env):
    import subprocess

    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def test_export_gguf_none_writes_no_gguf(gguf_copy):
    p = gguf_copy
    set_params(p / "params.yaml", {"export.gguf": "none"})
    assert repro(p) == {"validate", "export"}
    assert not list((p / "models/export").glob("*.gguf"))
    assert not (p / "models/export/Modelfile").exists()
    assert "gguf_file" not in json.loads((p / "metrics/export.json").read_text())


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
                           {**TINY_OVERRIDES, "base.source": "local", "base.path": str(model),
                            "export.gguf": "q8_0"})
    repro(project)
    return project


def test_a_base_model_without_a_chat_template_exports_a_gguf_without_one(base_model_project):
    from stages.export import gguf_metadata

    p = base_model_project
    assert json.loads((p / "metrics/tokenize.json").read_text())["template"] == "plain"
    export = json.loads((p / "metrics/export.json").read_text())
    assert export["gguf_chat_template"] is False
    assert gguf_metadata(p / "models/export/model.q8_0.gguf")["chat_template"] is None
    modelfile = (p / "models/export/Modelfile").read_text()
    template = modelfile.split('TEMPLATE """')[1].split('"""')[0]
    assert template == "You sort Debian packages.\n\n{{ .Prompt }}\n", "the plain format: system, prompt, new line"



def test_a_gemma_model_read_from_a_gguf_exports_a_gguf_that_reads_back_with_its_tokenizer(tmp_path):
    """transformers writes a Gemma tokenizer read from a GGUF as tokenizer.json alone; llama.cpp's converter,
    lacking the tokenizer.model it wants, writes that vocabulary as GPT-2 byte-level BPE, which no reader
    loads (`Token '\\n' out of vocabulary`), or it stops, not knowing the pre-tokenizer (this small
    vocabulary). The export carries the source GGUF's tokenizer instead."""
    from conftest import tiny_family_model
    from gguf_file import spm_vocabulary, write_gguf as write_source
    from stages.base import load_gguf
    from stages.export import load_gguf as read_back, write_gguf

    source = write_source(tiny_family_model("gemma3", len(spm_vocabulary()[0])), tmp_path / "gemma.gguf")
    model, tokenizer = load_gguf(source, "tiny gemma3")
    folder = tmp_path / "export"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert not (folder / "tokenizer.model").exists(), "what transformers writes: the case the converter gets wrong"
    text = "the section is perl\nnaïve: 漢字"  # a newline piece, merged pieces, byte fallback
    exported, back, _ = read_back(write_gguf(folder, "q8_0", source))
    # transformers asks gguf for a reader of the file for the config, the weights and the tokenizer, and
    # the export's check has them share one parse; if transformers stops asking gguf at each call, this fails.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.export import one_gguf_read

    gguf = folder / "model.q8_0.gguf"
    with one_gguf_read(gguf) as asked:
        AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name)
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    assert len(asked) >= 3 and set(asked) == {str(gguf.resolve())}, asked
    assert back.get_vocab() == tokenizer.get_vocab() and back(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert exported.get_input_embeddings().weight.shape[0] == len(tokenizer)

"""Shared fixtures: a tiny Llama built from a config, with the real SmolLM2 tokenizer.

Everything runs offline on CPU. The tiny model has the real vocabulary (so the real
chat template and tokenizer are exercised) but 2 layers of width 64.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "qlora", "tools", "accelerate", "data/raw"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` runs the suite on pytest-xdist workers, one more than the cores. Most of a test's time is a
# stage's Python (its imports, the trainer's loop around a 2-layer model), on one core, so a second worker
# uses the core the first leaves idle, and one more the time a test waits. Each worker's torch processes
# get a fixed, equal share of the cores: the same thread count in every run, so two runs a test compares
# agree as they do alone.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("QLORA_THREADS", str(max(1, len(os.sched_getaffinity(0)) // WORKERS)))

# How `make test` spreads the suite: each module's tests run on one worker, so its module-scoped fixtures
# are built once; the two modules that read the one reduced real run share a worker (it is built once
# per worker). The modules that reproduce whole pipelines go first, costliest first (make test's
# --durations), so that no worker is left running one of them alone at the end.
SHARED_RUN = {"tests/test_overfitting.py": "tests/test_real_default.py"}
COSTLIEST_FIRST = ["test_real_default", "test_overfitting", "test_experiments", "test_pipeline", "test_tune_workers",
                   "test_models", "test_regression", "test_tasks", "test_tune", "test_gguf", "test_faults",
                   "test_console", "test_remotes", "test_curves"]


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: none without it (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    """Whole modules to the workers, in the collection's order (pytest_collection_modifyitems)."""
    if config.getvalue("dist") not in ("load", "loadscope"):  # another mode, asked for by name
        return None
    from xdist.scheduler import LoadScopeScheduling

    assert callable(getattr(LoadScopeScheduling, "_split_scope", None)), "pytest-xdist renamed the scope split"

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return SHARED_RUN.get(module, module)

    config.option.loadscopereorder = False  # not by test count: the order set below
    return ByModule(config, log)


def pytest_configure(config):
    if WORKERS > 1:
        import torch

        torch.set_num_threads(int(os.environ["QLORA_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def own_peak_cache(tmp_path_factory):
    """Each worker keeps its own measured matmul peaks (qlora/cost.py), off the user's cache: two
    workers' stages never read the file while the other writes it."""
    if WORKERS > 1:
        os.environ.setdefault("QLORA_CACHE", str(tmp_path_factory.mktemp("qlora-cache")))


def built_once(tmp_path_factory, name, build):
    """`build(folder)` (which returns what the fixture gives, as JSON) run once for the whole suite: under
    xdist the first worker to ask builds it in the run's shared temporary folder while the others wait,
    then read it. A test copies what it changes (copy_project)."""
    if WORKERS <= 1:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # each worker's basetemp is a folder of this one
    record = shared / f"{name}.json"
    with FileLock(shared / f"{name}.lock"):
        if not record.exists():  # a build that failed left none: the next worker to ask tries again
            folder = shared / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            record.write_text(json.dumps(build(folder)))
    return json.loads(record.read_text())


def copy_project(src, dest):
    """A copy of a project for a test to change, without DVC's lock and index files (.dvc/tmp): another
    worker may be reading the original."""
    shutil.copytree(src, dest, symlinks=True,
                    ignore=lambda folder, names: ["tmp"] if Path(folder).name == ".dvc" else [])
    return dest


def pytest_collection_modifyitems(config, items):
    import torch

    cuda = torch.cuda.is_available()
    rank = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: the rest as collected
    for item in items:
        if item.get_closest_marker("cuda") and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if item.get_closest_marker("cpu") and cuda:
            item.add_marker(pytest.mark.skip(reason="holds only on a machine without a GPU"))


def tiny_config(vocab_size):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        # Embeddings 10x the default scale: with the default, logits of a random width-64 model
        # stay near uniform over 49k tokens and LoRA cannot lower the loss far enough to overfit.
        initializer_range=0.2,
    )


# Two more families beside Llama, where they differ from it: Qwen2 has biases on q, k and v;
# Gemma 3 scales its embeddings, normalises q and k, alternates sliding-window and global
# attention, and names its MLP the same but its norms differently. pad_token_id 0 (not the
# end-of-turn token 2, whose embedding row would start at zero) lets them learn to end an answer.
def tiny_family_config(family, vocab_size):
    from transformers import Gemma3TextConfig, Qwen2Config

    shared = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    if family == "qwen2":
        return Qwen2Config(**shared)
    if family == "gemma3":
        return Gemma3TextConfig(**dict(shared, num_key_value_heads=1), head_dim=16, sliding_window=64,
                                layer_types=["sliding_attention", "full_attention"])
    raise ValueError(family)


def tiny_family_model(family, vocab_size):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_family_config(family, vocab_size))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The real SmolLM2 tokenizer and chat template, read from the bundled GGUF once."""
    from transformers import AutoTokenizer

    from stages.base import BUNDLED_GGUF, bundled_dir

    def build(out):
        AutoTokenizer.from_pretrained(bundled_dir(), gguf_file=BUNDLED_GGUF).save_pretrained(out)
        return str(out)

    return Path(built_once(tmp_path_factory, "tokenizer", build))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A Hugging Face model folder (safetensors + tokenizer) of a 2-layer Llama, as a user's local model."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    def build(out):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        torch.manual_seed(0)
        LlamaForCausalLM(tiny_config(len(tokenizer))).save_pretrained(out)
        tokenizer.save_pretrained(out)
        return str(out)

    return Path(built_once(tmp_path_factory, "tiny-llama", build))


@pytest.fixture(scope="session")
def tiny_qwen2_gguf(tmp_path_factory):
    """A .gguf file of a 2-layer Qwen2 base model: no chat template (tests/gguf_file.py)."""
    from gguf_file import write_gguf
    from stages.base import BUNDLED_GGUF, bundled_dir

    out = tmp_path_factory.mktemp("tiny-qwen2") / "tiny-qwen2.gguf"
    return write_gguf(tiny_family_model("qwen2", 49152), out, bundled_dir() / BUNDLED_GGUF)


# Gemma 2's chat template: no system role (a system turn is an error), turns end with <end_of_turn>.
NO_SYSTEM_ROLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory, tokenizer_dir):
    """A local folder of a 2-layer Gemma 3 with Gemma's kind of chat template: no system role, and
    turns that end with <end_of_turn> (added to the SmolLM2 vocabulary as special tokens)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-gemma3")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = NO_SYSTEM_ROLE_TEMPLATE
    tiny_family_model("gemma3", len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def eval_pass_repacks(model, monkeypatch=None):
    """The 4-bit layers of `model` that an eval pass without grad repacked into bitsandbytes' CPU
    inference layout (the AVX512-BF16 trap, qlora/models.py `keep_4bit_weights_trainable`): after it
    no gradient flows through them. A list of names; empty where every layer kept its weights."""
    import bitsandbytes as bnb
    import torch

    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers, "no 4-bit layer to check"
    before = {n: m.weight.data.clone() for n, m in layers.items()}
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    return [n for n, m in layers.items() if getattr(m.weight.quant_state, "packing_format_for_cpu", False)
            or m.weight.data.shape != before[n].shape or not torch.equal(m.weight.data, before[n])]


def as_on_a_trap_cpu(monkeypatch):
    """4-bit layers built from now on behave as on a CPU with AVX512-BF16, whatever this CPU has."""
    import bitsandbytes.nn.modules as modules

    assert callable(modules.has_avx512bf16), "bitsandbytes renamed its AVX512-BF16 probe"
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)


def make_project(dest, overrides):
    """Copy the pipeline into a fresh git repo with DVC, params changed as `overrides` ({"a.b": v})."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    set_params(dest / "params.yaml", overrides)
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run(["dvc", "init", "-q"], dest)
    shutil.copy(ROOT / ".dvc/config", dest / ".dvc/config")  # the shipped settings (cache link type)
    run(["dvc", "config", "core.analytics", "false"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "init"], dest)
    return dest


def set_params(path, overrides):
    params = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run(cmd, cwd, check=True, env=None):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {}))
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


TINY_OVERRIDES = {
    "data.max_per_label": 8,
    "train.max_steps": 3,
    "train.batch_size": 4,
    "train.logging_steps": 1,
    "train.eval_steps": 1,
    "evaluate.max_new_tokens": 3,
    # Writing and reading back the GGUF file is most of a tiny run's export (its 49k-token vocabulary, parsed
    # in Python). tests/test_gguf.py and the reduced real default export one; the other tiny runs do not.
    "export.gguf": "none",
}


def locked_stages(project):
    """dvc.lock's entries of the stages that produce results. `validate` is left out: a valid
    change passes it and records it before a later stage fails or is killed, by design."""
    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {name: entry for name, entry in stages.items() if name != "validate"}


# The kernels capped at AVX2 (torch reads these at import): a CPU without native bf16, on any CPU
AVX2_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def repro(project, env=None):
    """`dvc repro`, commit the result, and return the names of the stages that ran."""
    out = run(["dvc", "repro"], project, env=env)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "repro", "--allow-empty"], project)
    return set(re.findall(r"Running stage '(\w+)'", out.stdout))


@pytest.fixture(scope="session")
def reproduced_project(tmp_path_factory, tiny_model_dir):
    """The real pipeline reproduced once in a temporary git + DVC repo, on the tiny local model. Read it,
    or change a copy (tiny_project)."""
    def build(folder):
        project = make_project(folder / "project",
                               {**TINY_OVERRIDES, "base.source": "local", "base.path": str(tiny_model_dir)})
        return str(project), sorted(repro(project))

    project, ran = built_once(tmp_path_factory, "reproduced", build)
    return Path(project), set(ran)


# The one reduced run of the real default (the bundled SmolLM2-135M, 4-bit NF4, the Debian data):
# 16 train examples, 16 epochs at a constant rate three times the default's. The pretrained model learns
# the task within a few epochs, then memorises the train split. tests/test_real_default.py checks the real
# path (GGUF, bitsandbytes on this CPU, trainer, generation, export) on this run, and
# tests/test_overfitting.py its curves: one run serves both.
REAL_EVAL_STEPS = 8
REAL_OVERRIDES = {
    "data.max_per_label": 4,  # 8 labels: 16 train, 8 val, 8 test
    "train.epochs": 16, "train.max_steps": -1, "train.batch_size": 4,  # 64 steps
    "train.learning_rate": 0.003, "train.lr_scheduler": "constant", "train.warmup_ratio": 0.0,
    "lora.dropout": 0.0, "train.eval_steps": REAL_EVAL_STEPS, "train.logging_steps": 4, "train.checkpoint_steps": 0,
}


@pytest.fixture(scope="session")
def real_project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("real") / "project", REAL_OVERRIDES)
    return project, repro(project)


@pytest.fixture
def tiny_project(tmp_path, reproduced_project):
    """A private copy of the reproduced project, for a test to change."""
    return copy_project(reproduced_project[0], tmp_path / "project")


def reproduced_copy(dest, reproduced_project, overrides):
    """A copy of the reproduced project (the tiny model) with the shipped params changed as `overrides`
    (only those: TINY_OVERRIDES are not kept), as a user edits a project that has run: the stages that
    read none of the changed params or data (base and quantize) need not run again."""
    copy_project(reproduced_project[0], dest)
    base = yaml.safe_load((dest / "params.yaml").read_text())["base"]  # the tiny model
    shutil.copy(ROOT / "params.yaml", dest / "params.yaml")
    set_params(dest / "params.yaml", {"base.source": base["source"], "base.path": base["path"], **overrides})
    return dest

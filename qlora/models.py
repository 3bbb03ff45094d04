"""Loading the base and quantized models, on CUDA when present and on CPU otherwise."""

import torch


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def quantization_config(q):
    """The BitsAndBytesConfig for params `quantize`; None for 16 bit (plain LoRA)."""
    from transformers import BitsAndBytesConfig

    compute_dtype = getattr(torch, q.compute_dtype)
    if q.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            # the dtype non-quantized weights (norms, embeddings) are stored in
            bnb_4bit_quant_storage=torch.uint8,
        )
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(path):
    """A model saved by the quantize stage; the bitsandbytes config travels in its config.json."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map={"": device()}, use_safetensors=True)
    model.config.use_cache = False
    return model


def keep_4bit_weights_trainable(model):
    """Turn off bitsandbytes' packed CPU inference path on every 4-bit layer; returns how many.

    The trap: on CPUs with AVX512-BF16, a `Linear4bit` forward in eval mode without
    grad repacks its weight in place into a CPU inference layout and never packs it
    back (bitsandbytes/nn/modules.py, Linear4bit.forward). From then on matmul_4bit
    takes `gemv_4bit`, a custom op with no autograd kernel, so no gradient flows back
    through that layer: LoRA matrices below it get wrong or no gradients, silently,
    after any mid-training evaluation or generate(). With the flag off, evaluation
    takes the same dequantize-and-matmul path as training.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            # Unpacking is lossy (bitsandbytes' inverse keeps bf16 scales): only a reload is clean.
            raise RuntimeError("a 4-bit layer was already repacked by an eval pass; reload the model first")
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def is_quantized(model):
    return getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)


def module_names(model):
    """Short names of the linear layers LoRA can target (q_proj, down_proj, ...)."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__}

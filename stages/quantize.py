"""Quantize the base model with bitsandbytes as params say, and measure what it costs.

4 bit (nf4 or fp4, double quant on or off), 8 bit (LLM.int8), or 16 (no
quantization: the weights in the compute dtype, for plain LoRA). The architecture is
unchanged; only how the weights are stored. Metrics: memory footprint, bits per
parameter, ratio to bf16, and the model's configuration.
"""

from pathlib import Path

import torch

from qlora import cores
from qlora.console import done, quiet_known_noise
from qlora.models import device, quantization_config
from qlora.outputs import atomic_dir, log, write_json
from qlora.params import load_params
from qlora.precision import storage_dtype

PARAMS = ["quantize", "paths.base", "paths.quantized", "paths.metrics"]


def describe(model):
    c = model.config
    return dict(
        parameters=count_parameters(model),
        layers=c.num_hidden_layers,
        heads=c.num_attention_heads,
        kv_heads=getattr(c, "num_key_value_heads", c.num_attention_heads),
        hidden_size=c.hidden_size,
        intermediate_size=getattr(c, "intermediate_size", None),
        vocab_size=c.vocab_size,
        context_length=getattr(c, "max_position_embeddings", None),
    )


def count_parameters(model):
    # A 4-bit weight is stored as uint8 holding two values; count the values, not the bytes.
    packed = 2 if getattr(model, "is_loaded_in_4bit", False) else 1
    return sum(t.numel() * (packed if t.dtype == torch.uint8 else 1) for t in model.parameters())


def main():
    quiet_known_noise()  # before bitsandbytes is imported
    cores.claim()  # its share of the cores, with other stages running at once
    from transformers import AutoModelForCausalLM

    p = load_params(PARAMS)
    q = p.quantize
    log(f"loading {p.paths.base} as {q.bits} bit" + (f" {q.quant_type}, double quant {q.double_quant}" if q.bits == 4 else ""))
    model = AutoModelForCausalLM.from_pretrained(
        p.paths.base,
        quantization_config=quantization_config(q),
        dtype=getattr(torch, storage_dtype(q.compute_dtype)),  # auto: bf16 storage, the compute resolved at load
        device_map={"": device()},
        use_safetensors=True,
    )
    config = describe(model)
    footprint = model.get_memory_footprint()
    with atomic_dir(p.paths.quantized) as out:
        model.save_pretrained(out)
    on_disk = sum(f.stat().st_size for f in Path(p.paths.quantized).glob("*.safetensors"))
    metrics = dict(
        bits=q.bits,
        memory_footprint_mb=round(footprint / 2**20, 1),
        disk_mb=round(on_disk / 2**20, 1),
        bits_per_parameter=round(footprint * 8 / config["parameters"], 2),
        ratio_to_bf16=round(footprint / (config["parameters"] * 2), 3),
        **config,
    )
    write_json(Path(p.paths.metrics) / "quantize.json", metrics)
    done(f"{metrics['parameters'] / 1e6:.1f}M parameters at {q.bits} bit: {metrics['memory_footprint_mb']} MB in "
         f"memory, {metrics['bits_per_parameter']} bits/parameter, {metrics['ratio_to_bf16']}x bf16")


if __name__ == "__main__":
    main()

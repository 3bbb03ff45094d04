"""A base model folder with random weights from a published architecture, for speed and memory only.

    python benchmarks/random_model.py --arch llama3-8b --out /tmp/llama3-8b [--layers N]

Throughput and memory depend on the shapes, not on the weights, so a model built from the
architecture's config measures what training the real one costs without downloading it. The
tokenizer is the project's (models/tokenizer): its ids all fall inside the larger vocabulary,
and the LM head keeps the architecture's full vocabulary size. The weights are drawn with the
architecture's own initialisation (normal, std initializer_range), in bfloat16, on the GPU when
there is one, and saved as safetensors beside the config and tokenizer.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The shapes of meta-llama/Meta-Llama-3-8B's config.json (the model card's architecture).
ARCHS = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, hidden_act="silu"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama3-8b")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--layers", type=int, help="fewer layers than the architecture's (a quick check of this script)")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "models/tokenizer")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    shape = dict(ARCHS[args.arch])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = AutoConfig.for_model(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = AutoModelForCausalLM.from_config(config)
        finally:
            torch.set_default_dtype(previous)
    if args.out.exists():
        shutil.rmtree(args.out)
    model.save_pretrained(args.out, max_shard_size="5GB")
    for f in args.tokenizer.iterdir():
        shutil.copy(f, args.out / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {n / 1e9:.2f}B parameters, {config.num_hidden_layers} layers, written to {args.out} "
          f"in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

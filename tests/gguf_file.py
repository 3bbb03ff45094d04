"""Write a tiny Qwen2 or Gemma 3 model as a GGUF file, as llama.cpp's converter lays one out, for
the tests of `base.source: gguf`.

Tensor names come from the `gguf` package's own name map; metadata keys are the ones transformers
reads back (transformers/integrations/ggml.py). Gemma's norms are stored plus one, as llama.cpp
stores them. The tokenizer is the bundled SmolLM2 GGUF's (a byte-level BPE, as Qwen2's is), copied
field by field, without a chat template: a base model. (transformers picks the tokenizer class by
architecture, so a Gemma file needs Gemma's own sentencepiece vocabulary to read back right.)
"""

import numpy as np


ARCHS = {"qwen2": "QWEN2", "gemma3_text": "GEMMA3"}


def write_gguf(model, out, tokenizer_gguf):
    import gguf

    c = model.config
    arch = getattr(gguf.MODEL_ARCH, ARCHS[c.model_type])
    gemma = c.model_type.startswith("gemma")
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name("tiny gemma3 for tests")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if gemma:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
        writer.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
        writer.add_sliding_window(c.sliding_window)
    else:
        writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    copy_tokenizer(writer, tokenizer_gguf)

    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embeddings: llama.cpp writes no output.weight then
            continue
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"no GGUF name for {name}")
        data = tensor.float().numpy()
        if gemma and name.endswith("norm.weight"):
            data = data + 1
        writer.add_tensor(mapped, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def copy_tokenizer(writer, source):
    """The tokenizer.ggml.* fields of another GGUF file; its chat template is left out."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    f = {k: v.contents() for k, v in reader.fields.items() if k.startswith("tokenizer.")}
    writer.add_tokenizer_model(f["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in f:
        writer.add_tokenizer_pre(f["tokenizer.ggml.pre"])
    writer.add_token_list(f["tokenizer.ggml.tokens"])
    writer.add_token_types(f["tokenizer.ggml.token_type"])
    writer.add_token_merges(f["tokenizer.ggml.merges"])
    writer.add_bos_token_id(f["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(f["tokenizer.ggml.eos_token_id"])
    if "tokenizer.ggml.padding_token_id" in f:
        writer.add_pad_token_id(f["tokenizer.ggml.padding_token_id"])

"""Write a tiny Qwen2 or Gemma 3 model as a GGUF file, as llama.cpp's converter lays one out, for
the tests of `base.source: gguf`.

Tensor names come from the `gguf` package's own name map; metadata keys are the ones transformers
reads back (transformers/integrations/ggml.py). Gemma's norms are stored plus one, as llama.cpp
stores them. The tokenizer is the bundled SmolLM2 GGUF's (a byte-level BPE, as Qwen2's is), copied
field by field, without a chat template: a base model; or, for Gemma, a small vocabulary of Gemma's
kind (spm_tokenizer). transformers picks the tokenizer class by architecture, so a Gemma file read
back right needs the sentencepiece kind.
"""

import string

import numpy as np


ARCHS = {"qwen2": "QWEN2", "gemma3_text": "GEMMA3"}


def write_gguf(model, out, tokenizer_gguf=None):
    """`tokenizer_gguf`: the GGUF file whose tokenizer is copied; None: spm_tokenizer's."""
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
    copy_tokenizer(writer, tokenizer_gguf) if tokenizer_gguf else spm_tokenizer(writer)

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


def spm_vocabulary():
    """A vocabulary of Gemma's kind, as its GGUF holds one (tokenizer.ggml.model llama): control tokens,
    the 256 byte pieces a SentencePiece tokenizer falls back to, a literal newline piece, `▁` for a
    space, characters and a few merged pieces, scored by rank."""
    import gguf

    kind = gguf.TokenType
    pieces = [("<pad>", kind.CONTROL), ("<eos>", kind.CONTROL), ("<bos>", kind.CONTROL), ("<unk>", kind.UNKNOWN),
              ("<mask>", kind.USER_DEFINED),
              ("<start_of_turn>", kind.USER_DEFINED), ("<end_of_turn>", kind.USER_DEFINED)]
    pieces += [(f"<0x{b:02X}>", kind.BYTE) for b in range(256)]
    words = ["\n", "▁", *string.ascii_letters, *string.digits, *".,:;!?-_()'\"/", *("▁" + c for c in string.ascii_lowercase),
             "▁the", "▁is", "▁section", "in", "er", "on", "▁pe", "▁per", "▁perl"]
    pieces += [(w, kind.NORMAL) for w in words]
    scores = [-float(i) if k == kind.NORMAL else 0.0 for i, (_, k) in enumerate(pieces)]
    return [p for p, _ in pieces], scores, [int(k) for _, k in pieces]


def spm_tokenizer(writer):
    tokens, scores, types = spm_vocabulary()
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokens.index("<bos>"))
    writer.add_eos_token_id(tokens.index("<eos>"))
    writer.add_pad_token_id(tokens.index("<pad>"))
    writer.add_unk_token_id(tokens.index("<unk>"))
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)

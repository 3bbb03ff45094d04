"""Apply the chat template and mask the prompt, so the loss is on the completion only.

Depends on the tokenizer files, not the weights: re-quantizing the model does not
re-tokenize. Examples longer than `tokenize.max_length` are cut at the end and
counted; an example whose prompt alone fills max_length has nothing left to learn
and is dropped (counted too).
"""

import json
from pathlib import Path

from qlora.outputs import atomic_dir, log, write_json
from qlora.params import load_params
from qlora.splits import IGNORE_INDEX, SPLITS

PARAMS = ["tokenize", "paths.prepared", "paths.tokenizer", "paths.tokenized", "paths.metrics"]



def prompt_turns(messages, system_prompt):
    if system_prompt and messages[0]["role"] != "system":
        return [dict(role="system", content=system_prompt), *messages]
    return messages


def encode(tokenizer, messages, completion, max_length):
    """Token ids of prompt + completion in the chat template, and labels masking the prompt."""
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(
        [*messages, dict(role="assistant", content=completion)], tokenize=True, return_dict=False
    )
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise SystemExit("the chat template renders the prompt differently with and without the answer; "
                         "prompt masking would be wrong for this tokenizer")
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return dict(
        input_ids=full_ids[:max_length],
        labels=labels[:max_length],
        prompt_length=len(prompt_ids),
        truncated=len(full_ids) > max_length,
    )


def tokenize_split(tokenizer, path, t):
    rows, dropped = [], 0
    for line in open(path):
        ex = json.loads(line)
        messages = prompt_turns(ex["messages"], t.system_prompt)
        enc = encode(tokenizer, messages, ex["completion"], t.max_length)
        if enc["prompt_length"] >= t.max_length:
            dropped += 1
            continue
        rows.append(dict(enc, prompt=messages[-1]["content"], completion=ex["completion"]))
    return rows, dropped


def main():
    import pandas as pd
    from transformers import AutoTokenizer

    p = load_params(PARAMS)
    tokenizer = AutoTokenizer.from_pretrained(p.paths.tokenizer)
    metrics = dict(truncated=0, dropped_prompt_too_long=0, max_tokens=0)
    with atomic_dir(p.paths.tokenized) as out:
        for name in SPLITS:
            rows, dropped = tokenize_split(tokenizer, Path(p.paths.prepared) / f"{name}.jsonl", p.tokenize)
            if not rows:
                raise SystemExit(f"tokenize: every {name} example has a prompt longer than "
                                 f"tokenize.max_length={p.tokenize.max_length}; raise it")
            frame = pd.DataFrame(rows)
            frame.to_parquet(out / f"{name}.parquet", index=False)
            lengths = frame["input_ids"].map(len)
            truncated = int(frame["truncated"].sum())
            metrics["truncated"] += truncated
            metrics["dropped_prompt_too_long"] += dropped
            metrics["max_tokens"] = max(metrics["max_tokens"], int(lengths.max()))
            metrics[f"{name}_tokens"] = int(lengths.sum())
            log(f"{name}: {len(frame)} examples, {int(lengths.sum())} tokens, {truncated} truncated, {dropped} dropped")
    write_json(Path(p.paths.metrics) / "tokenize.json", metrics)


if __name__ == "__main__":
    main()

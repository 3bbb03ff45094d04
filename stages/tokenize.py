"""Render each example in the model's format and mask the prompt, so the loss is on the completion only.

Two formats (`tokenize.template`):
- `chat`: the tokenizer's chat template, the answer as the assistant turn. A template
  without a system role (Gemma's, for one) gets `tokenize.system_prompt` folded into the
  first user turn instead of an error or a silent drop; the metrics say which happened.
- `plain`, for base (pretrained-only) models, which have no chat template: the system
  prompt and the prompt, a new line, then the answer and the end-of-sequence token
  (`PLAIN`). Earlier turns of a conversation are written as `User:` / `Assistant:` lines.
`auto` (the default) is `chat` when the tokenizer has a template and `plain` otherwise.

The format, its hash and the tokens that end an answer go to `format.json` beside the
splits (the scorers generate with the same format and stop at the same tokens) and to
`metrics/tokenize.json`, so that `dvc exp show` tells runs of different formats apart.
Depends on the tokenizer files, not the weights: re-quantizing the model does not
re-tokenize. Examples longer than `tokenize.max_length` are cut at the end and counted;
an example whose prompt alone fills max_length would keep no labelled token (nothing to
learn, nothing to score): the stage stops, naming how many and the params that fix it.
"""

import hashlib
import json
from pathlib import Path

from qlora.outputs import atomic_dir, log, write_json
from qlora.params import ParamsError, load_params
from qlora.splits import FORMAT, IGNORE_INDEX, SPLITS

PARAMS = ["tokenize", "paths.prepared", "paths.tokenizer", "paths.tokenized", "paths.metrics"]

# The plain format: what a base model continues. The answer follows the prompt's last new line and
# ends with the tokenizer's end-of-sequence token, which generation then stops at.
PLAIN = "{system}\n\n{prompt}\n{answer}<eos>"
PROBE = "SYSTEM-PROMPT-PROBE"
SENTINEL = "ANSWER-SENTINEL-7f3a"  # an answer no template rewrites, to see where the answer begins


def resolve_template(setting, tokenizer):
    """tokenize.template with `auto` resolved; `chat` on a tokenizer without a template is an error."""
    has_chat = bool(tokenizer.chat_template)
    if setting == "chat" and not has_chat:
        raise ParamsError("params.yaml: tokenize.template is chat, but the tokenizer in paths.tokenizer has no chat "
                          "template (a base model); use auto or plain")
    if setting == "auto":
        return "chat" if has_chat else "plain"
    return setting


def has_system_role(tokenizer):
    """Whether the chat template renders a system turn (some raise on one, others drop it)."""
    turns = [dict(role="system", content=PROBE), dict(role="user", content="hi")]
    try:
        return PROBE in tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # jinja2's TemplateError from `raise_exception`, or whatever the template does
        return False


def with_system(messages, system_prompt, system_role):
    """The prompt turns with the system prompt added: as a turn of its own, or folded into the first
    user turn (data's own system turn too) when the template has no system role."""
    if system_prompt and messages[0]["role"] != "system":
        messages = [dict(role="system", content=system_prompt), *messages]
    if system_role or messages[0]["role"] != "system":
        return messages
    system, first, *rest = messages
    return [dict(first, content=f"{system['content']}\n\n{first['content']}"), *rest]


def plain_prompt(messages):
    """The prompt text of the plain format: system text, then the user's prompt; earlier turns of a
    conversation as `User:` / `Assistant:` lines."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        body = turns[0]["content"]
    else:
        body = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns) + "\nAssistant:"
    return "".join(f"{s}\n\n" for s in system) + body + "\n"


class Format:
    """How examples are rendered to tokens: the prompt's ids, and the answer's ids with what ends it."""

    def __init__(self, tokenizer, template, system_prompt):
        self.tokenizer, self.template = tokenizer, template
        self.system_role = template == "plain" or has_system_role(tokenizer)
        self.system_prompt = system_prompt
        text = tokenizer.chat_template if template == "chat" else PLAIN
        if not isinstance(text, str):  # several named templates
            text = json.dumps(text, sort_keys=True)
        self.hash = hashlib.sha256(text.encode()).hexdigest()[:12]
        self.end_ids = set()  # the tokens that end an answer: generation stops at them
        self.mask_checked = False

    def encode(self, messages, completion):
        messages = with_system(messages, self.system_prompt, self.system_role)
        if self.template == "plain":
            tok = self.tokenizer
            prompt_ids = tok(plain_prompt(messages))["input_ids"]  # with the BOS token where the model has one
            if prompt_ids and prompt_ids[-1] == tok.eos_token_id:  # a tokenizer that ends every text with EOS
                prompt_ids = prompt_ids[:-1]
            answer_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            return messages, prompt_ids, prompt_ids + answer_ids
        prompt_ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False)
        full_ids = self.tokenizer.apply_chat_template([*messages, dict(role="assistant", content=completion)],
                                                      tokenize=True, return_dict=False)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise SystemExit("the chat template renders the prompt differently with and without the answer; "
                             "prompt masking would be wrong for this tokenizer (try tokenize.template: plain)")
        if not self.mask_checked:
            self.check_mask(messages)
        # The end of the assistant turn: the first special token after the answer (<|im_end|>,
        # <end_of_turn>, <|eot_id|>), or the end-of-sequence token when the template writes none.
        special = set(self.tokenizer.all_special_ids)
        self.end_ids.add(next((t for t in full_ids[len(prompt_ids):] if t in special), self.tokenizer.eos_token_id))
        return messages, prompt_ids, full_ids

    def check_mask(self, messages):
        """Stop if the chat template writes anything into the assistant turn, before the answer, that
        the generation prompt leaves out (an assistant header it adds only to past turns, empty
        reasoning tags): those tokens would carry labels, the model would learn to write them before
        every answer, and its answers would not score. Checked once, with a sentinel answer."""
        tok = self.tokenizer
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template([*messages, dict(role="assistant", content=SENTINEL)], tokenize=True,
                                       return_dict=False)
        labelled = tok.decode(full[len(prompt):], skip_special_tokens=True).lstrip()
        if not labelled.startswith(SENTINEL):
            before = labelled[: max(labelled.find(SENTINEL), 0)] or labelled[:40]
            raise SystemExit(
                f"tokenize: the chat template puts {before!r} before the answer in the assistant turn, which the "
                "generation prompt (add_generation_prompt) does not end with: those tokens would be trained as "
                "part of every answer (the prompt leaks into the loss mask). Use tokenize.template: plain, or a "
                "template whose generation prompt ends where the answer begins.")
        self.mask_checked = True

    def describe(self):
        if not self.system_prompt:
            system = "none"
        elif self.template == "plain":
            system = "first lines of the prompt"
        else:
            system = "system turn" if self.system_role else "folded into the first user turn"
        ends = sorted(self.end_ids | {self.tokenizer.eos_token_id})
        return dict(template=self.template, template_hash=self.hash, system_prompt=system,
                    stop_token_ids=ends, stop_tokens=self.tokenizer.convert_ids_to_tokens(ends))


def encode(fmt, messages, completion, max_length):
    """Token ids of prompt + completion in the format, and labels masking the prompt."""
    messages, prompt_ids, full_ids = fmt.encode(messages, completion)
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return dict(
        input_ids=full_ids[:max_length],
        labels=labels[:max_length],
        prompt_length=len(prompt_ids),
        truncated=len(full_ids) > max_length,
    ), messages


def labelled_share(rows):
    """The share of a split's tokens that carry a label (the answer and what ends it). Stops if a label
    falls on a prompt token: the mask would be wrong."""
    covering = sum(any(t != IGNORE_INDEX for t in r["labels"][: r["prompt_length"]]) for r in rows)
    if covering:
        raise SystemExit(f"tokenize: the labels of {covering} examples cover part of their prompt; the loss mask "
                         "is wrong")
    labelled = sum(t != IGNORE_INDEX for r in rows for t in r["labels"])
    return round(labelled / sum(len(r["labels"]) for r in rows), 4)


def tokenize_split(fmt, path, max_length):
    """The split's rows; stops if any example would keep no labelled token once cut to max_length."""
    rows = []
    for line in open(path):
        ex = json.loads(line)
        enc, messages = encode(fmt, ex["messages"], ex["completion"], max_length)
        rows.append(dict(enc, prompt=messages[-1]["content"], completion=ex["completion"]))
    unlabelled = [i for i, r in enumerate(rows, 1) if r["prompt_length"] >= max_length]
    if unlabelled:
        longest = max(rows[i - 1]["prompt_length"] for i in unlabelled)
        where = ", ".join(map(str, unlabelled[:5])) + (" ..." if len(unlabelled) > 5 else "")
        raise SystemExit(
            f"tokenize: {len(unlabelled)} of {len(rows)} examples in {path} (lines {where}) would have no labelled "
            f"token: their prompt alone fills tokenize.max_length={max_length} (the longest is {longest} tokens, "
            "with the system prompt and template). Raise tokenize.max_length above that, shorten "
            "tokenize.system_prompt or data.prompt_template, or take these rows out of the data.")
    return rows


def main():
    import pandas as pd
    from transformers import AutoTokenizer

    p = load_params(PARAMS)
    t = p.tokenize
    tokenizer = AutoTokenizer.from_pretrained(p.paths.tokenizer)
    fmt = Format(tokenizer, resolve_template(t.template, tokenizer), t.system_prompt)
    metrics = dict(truncated=0, max_tokens=0)
    with atomic_dir(p.paths.tokenized) as out:
        for name in SPLITS:
            rows = tokenize_split(fmt, Path(p.paths.prepared) / f"{name}.jsonl", t.max_length)
            frame = pd.DataFrame(rows)
            frame.to_parquet(out / f"{name}.parquet", index=False)
            lengths = frame["input_ids"].map(len)
            truncated = int(frame["truncated"].sum())
            metrics["truncated"] += truncated
            metrics["max_tokens"] = max(metrics["max_tokens"], int(lengths.max()))
            metrics[f"{name}_labelled_share"] = labelled_share(rows)
            metrics[f"{name}_tokens"] = int(lengths.sum())
            log(f"{name}: {len(frame)} examples, {int(lengths.sum())} tokens, {truncated} truncated")
        described = fmt.describe()  # after encoding: the stop tokens are those the answers ended with
        write_json(out / FORMAT, described)
    write_json(Path(p.paths.metrics) / "tokenize.json", dict(metrics, **{k: described[k] for k in
                                                                          ("template", "template_hash", "system_prompt")}))
    log(f"format {described['template']} ({described['template_hash']}), system prompt: {described['system_prompt']}, "
        f"answers end with {described['stop_tokens']}")


if __name__ == "__main__":
    main()

"""params.yaml, typed and validated before any heavy work.

Every stage calls `load_params(PARAMS)` with the keys it declares in dvc.yaml. The
whole file is checked (unknown keys, types, ranges, allowed values) and the stage
gets a view that refuses keys it did not declare, so dvc.yaml cannot drift from
what the code reads without a stage failing.
"""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

PARAMS_FILE = "params.yaml"


class ParamsError(SystemExit):
    """A bad value in params.yaml: the stage exits non-zero with this message, naming file, key and value."""


@dataclass(frozen=True)
class Paths:
    raw: str
    prepared: str
    tokenized: str
    base: str
    tokenizer: str
    quantized: str
    adapter: str
    export: str
    checkpoints: str
    metrics: str


@dataclass(frozen=True)
class Data:
    hub_id: str | None
    hub_split: str
    prompt_field: str | None
    completion_field: str | None
    messages_field: str | None
    prompt_template: str | None
    labels: list[str]
    max_per_label: int | None
    bad_rows: str
    val_fraction: float
    test_fraction: float
    seed: int


@dataclass(frozen=True)
class Base:
    source: str
    path: str | None
    hub_id: str | None
    revision: str | None
    trust_remote_code: bool


@dataclass(frozen=True)
class Tokenize:
    max_length: int
    template: str
    system_prompt: str | None


@dataclass(frozen=True)
class Quantize:
    bits: int
    quant_type: str
    double_quant: bool
    compute_dtype: str
    quant_storage: str


@dataclass(frozen=True)
class Lora:
    r: int
    alpha: float
    dropout: float
    target_modules: list[str] | str
    bias: str


@dataclass(frozen=True)
class Train:
    epochs: float
    max_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    lr_scheduler: str
    warmup_ratio: float
    optimizer: str
    weight_decay: float
    max_grad_norm: float
    gradient_checkpointing: bool
    gradient_checkpointing_every: int
    attn_implementation: str
    group_by_length: bool
    padding_free: bool
    processes: int
    distributed: str
    logging_steps: int
    eval_steps: int
    early_stopping_patience: int
    early_stopping_min_delta: float
    checkpoint_steps: int
    seed: int


@dataclass(frozen=True)
class Evaluate:
    task: str
    batch_size: int
    max_new_tokens: int | str
    overfitting_rise_pct: float
    samples: int


@dataclass(frozen=True)
class Export:
    dtype: str
    check_examples: int
    loss_tolerance: float
    metric_tolerance: float


@dataclass(frozen=True)
class Params:
    paths: Paths
    data: Data
    base: Base
    tokenize: Tokenize
    quantize: Quantize
    lora: Lora
    train: Train
    evaluate: Evaluate
    export: Export


SOURCES = ("bundled", "local", "gguf", "hub")
TEMPLATES = ("auto", "chat", "plain")
ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output head
TASKS = ("auto", "classification", "generation")
# Text params in which `\n` written as two characters (as `dvc exp run -S` passes it) means a new line.
MULTILINE = {"data.prompt_template", "tokenize.system_prompt"}
BITS = (4, 8, 16)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
LORA_BIASES = ("none", "all", "lora_only")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_bnb_8bit", "adamw_8bit",
    "paged_adamw_32bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit", "rmsprop",
)


def load_params(declared, path=PARAMS_FILE):
    """Validate the whole params file; return a view limited to the `declared` keys."""
    params = parse_params(path)
    return _DeclaredView(params, frozenset(declared), "")


def parse_params(path=PARAMS_FILE):
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    params = _build(Params, raw, path, "")
    _check(params, path)
    return params


def _build(cls, raw, path, prefix):
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: {where} must be a mapping, got {raw!r}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ParamsError(f"{path}: unknown key {prefix}{unknown[0]} (known: {', '.join(names)})")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ParamsError(f"{path}: missing key {prefix}{missing[0]}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name in names:
        key, value, hint = f"{prefix}{name}", raw[name], hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, path, f"{key}.")
        else:
            values[name] = _coerce(value, hint, path, key)
            if key in MULTILINE and isinstance(values[name], str):
                values[name] = values[name].replace("\\n", "\n")
    return cls(**values)


def _coerce(value, hint, path, key):
    """Check `value` against a simple type hint; ints are accepted where floats are."""
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    lists = [a for a in typing.get_args(hint) if typing.get_origin(a) is list]
    if lists:  # a list, or one word such as all-linear that _check allows
        if isinstance(value, str):
            return value
        hint = lists[0]
    if typing.get_origin(hint) is list:
        # Labels written as numbers ([1, 2, 3]) are the text they read as: answers are text.
        ok = isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                             and str(v).strip() for v in value)
        if not ok:
            raise ParamsError(f"{path}: {key} must be a list of non-empty strings, got {value!r}")
        return [str(v) for v in value]
    if hint == int | str:  # an integer, or a word such as `auto` that _check allows
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ParamsError(f"{path}: {key} must be an integer or a word, got {value!r}")
        return value
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        # PyYAML reads 1e-4 (no dot) as a string, while `dvc exp run -S` writes it so.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
        raise ParamsError(f"{path}: {key} must be {kind}, got {value!r}")
    return value


def _check(p, path):
    """Ranges and allowed values, each error naming the key and the value."""

    def require(ok, key, value, what):
        if not ok:
            raise ParamsError(f"{path}: {key} must be {what}, got {value!r}")

    def one_of(key, value, allowed):
        require(value in allowed, key, value, "one of " + ", ".join(map(str, allowed)))

    d = p.data
    require(d.prompt_field or d.prompt_template or d.messages_field, "data.prompt_field", d.prompt_field,
            "set (or data.prompt_template or data.messages_field)")
    require(d.completion_field or d.messages_field, "data.completion_field", d.completion_field,
            "set (or data.messages_field)")
    one_of("data.bad_rows", d.bad_rows, ("error", "drop"))
    require(d.max_per_label is None or d.max_per_label > 0, "data.max_per_label", d.max_per_label, "a positive integer or null")
    require(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "between 0 and 1")
    require(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "between 0 and 1")
    require(d.val_fraction + d.test_fraction < 1, "data.test_fraction", d.test_fraction,
            f"small enough to leave training data (val_fraction is {d.val_fraction})")

    b = p.base
    one_of("base.source", b.source, SOURCES)
    if b.source == "local":
        require(bool(b.path), "base.path", b.path, "a model folder when base.source is local")
    if b.source == "gguf":
        require(bool(b.path) and str(b.path).endswith(".gguf"), "base.path", b.path,
                "a .gguf file when base.source is gguf")
    if b.source == "hub":
        require(bool(b.hub_id), "base.hub_id", b.hub_id, "a hub model id when base.source is hub")
        require(bool(b.revision), "base.revision", b.revision, "a pinned commit hash when base.source is hub")

    require(p.tokenize.max_length >= 16, "tokenize.max_length", p.tokenize.max_length, "an integer >= 16")
    one_of("tokenize.template", p.tokenize.template, TEMPLATES)

    q = p.quantize
    one_of("quantize.bits", q.bits, BITS)
    one_of("quantize.quant_type", q.quant_type, QUANT_TYPES)
    one_of("quantize.compute_dtype", q.compute_dtype, COMPUTE_DTYPES)
    one_of("quantize.quant_storage", q.quant_storage, ("uint8",) + COMPUTE_DTYPES)

    lo = p.lora
    require(lo.r > 0, "lora.r", lo.r, "a positive integer")
    require(lo.alpha > 0, "lora.alpha", lo.alpha, "a positive number")
    require(0 <= lo.dropout < 1, "lora.dropout", lo.dropout, "in [0, 1)")
    require(lo.target_modules == ALL_LINEAR if isinstance(lo.target_modules, str) else len(lo.target_modules) > 0,
            "lora.target_modules", lo.target_modules, f"a non-empty list of module names, or {ALL_LINEAR}")
    one_of("lora.bias", lo.bias, LORA_BIASES)

    t = p.train
    require(t.epochs > 0, "train.epochs", t.epochs, "a positive number")
    require(t.max_steps == -1 or t.max_steps > 0, "train.max_steps", t.max_steps, "-1 or a positive integer")
    require(t.batch_size > 0, "train.batch_size", t.batch_size, "a positive integer")
    require(t.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps", t.gradient_accumulation_steps,
            "a positive integer")
    require(0 < t.learning_rate < 1, "train.learning_rate", t.learning_rate, "between 0 and 1")
    one_of("train.lr_scheduler", t.lr_scheduler, SCHEDULERS)
    require(0 <= t.warmup_ratio < 1, "train.warmup_ratio", t.warmup_ratio, "in [0, 1)")
    one_of("train.optimizer", t.optimizer, OPTIMIZERS)
    require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    require(t.max_grad_norm > 0, "train.max_grad_norm", t.max_grad_norm, "a positive number")
    require(t.gradient_checkpointing_every > 0, "train.gradient_checkpointing_every", t.gradient_checkpointing_every,
            "a positive integer")
    one_of("train.attn_implementation", t.attn_implementation, ATTN_IMPLEMENTATIONS)
    require(t.processes > 0, "train.processes", t.processes, "a positive integer")
    require(bool(t.distributed) and "/" not in t.distributed, "train.distributed", t.distributed,
            "the name of a config in accelerate/ (ddp, fsdp, or one of yours)")
    require(t.logging_steps > 0, "train.logging_steps", t.logging_steps, "a positive integer")
    require(t.eval_steps > 0, "train.eval_steps", t.eval_steps, "a positive integer")
    require(t.early_stopping_patience >= 0, "train.early_stopping_patience", t.early_stopping_patience,
            "0 (off) or a positive integer")
    require(t.early_stopping_min_delta >= 0, "train.early_stopping_min_delta", t.early_stopping_min_delta, ">= 0")
    require(t.checkpoint_steps >= 0, "train.checkpoint_steps", t.checkpoint_steps, "0 (off) or a positive integer")

    e = p.evaluate
    one_of("evaluate.task", e.task, TASKS)
    require(e.batch_size > 0, "evaluate.batch_size", e.batch_size, "a positive integer")
    require(e.max_new_tokens == "auto" or isinstance(e.max_new_tokens, int) and e.max_new_tokens > 0,
            "evaluate.max_new_tokens", e.max_new_tokens, "auto or a positive integer")
    require(e.overfitting_rise_pct >= 0, "evaluate.overfitting_rise_pct", e.overfitting_rise_pct, ">= 0")
    require(e.samples >= 0, "evaluate.samples", e.samples, "0 or a positive integer")

    one_of("export.dtype", p.export.dtype, COMPUTE_DTYPES)
    require(p.export.check_examples > 0, "export.check_examples", p.export.check_examples, "a positive integer")
    require(p.export.loss_tolerance > 0, "export.loss_tolerance", p.export.loss_tolerance, "a positive number")
    require(0 <= p.export.metric_tolerance <= 1, "export.metric_tolerance", p.export.metric_tolerance, "in [0, 1]")


class _DeclaredView:
    """Read-only access to the declared keys; reading any other key is a bug in dvc.yaml or the stage."""

    def __init__(self, obj, declared, prefix):
        self._obj, self._declared, self._prefix = obj, declared, prefix

    def __getattr__(self, name):
        key = self._prefix + name
        value = getattr(self._obj, name)
        if key in self._declared or any(key.startswith(d + ".") for d in self._declared):
            return value
        if any(d.startswith(key + ".") for d in self._declared):
            return _DeclaredView(value, self._declared, key + ".")
        raise AttributeError(f"{key} is read but not declared in this stage's params (dvc.yaml and PARAMS)")

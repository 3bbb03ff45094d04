"""params.yaml, typed and validated before any heavy work.

The schema is a set of pydantic dataclasses: each key's type, bounds and allowed values sit
on its field, with the phrase an error states (`must`), and the few rules across keys sit in
a validator beside them. A lever is one field here, one line in params.yaml and one in docs.

Every stage calls `load_params(PARAMS)` with the keys it declares in dvc.yaml. The whole file
is checked (unknown keys, types, ranges, allowed values) and the stage gets a view that
refuses keys it did not declare, so dvc.yaml cannot drift from what the code reads without a
stage failing. Errors name the file, the key and the value.
"""

import types
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

PARAMS_FILE = "params.yaml"


class ParamsError(SystemExit):
    """A bad value in params.yaml: the stage exits non-zero with this message, naming file, key and value."""


def must(what, **bounds):
    """A field's bounds with the phrase its error states: `<key> must be <what>, got <value>`."""
    return Field(strict=True, **bounds, json_schema_extra={"must": what})


def either(*types, what):
    """A union (for example a number or null) whose every error states `what`."""
    return Annotated[typing.Union[types], Field(json_schema_extra={"must": what})]


def nonzero(value):
    if value == 0:
        raise ValueError("-1 or a positive integer")
    return value


def choice(*values):
    return Annotated[Literal[values], Field(json_schema_extra={"must": "one of " + ", ".join(map(str, values))})]


def rule(key, value, what):
    """An error of a rule across keys, in the same words as a field's."""
    return PydanticCustomError("params", "{key} must be {what}, got {value}",
                               {"key": key, "what": what, "value": repr(value)})


def _yaml_number(value):
    # PyYAML reads 1e-4 (no dot) as a string, while `dvc exp run -S` writes it so.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _text_list(value):
    # Labels written as numbers ([1, 2, 3]) are the text they read as: answers are text.
    ok = isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                         and str(v).strip() for v in value)
    if not ok:
        raise ValueError("a list of non-empty strings")
    return [str(v) for v in value]


def _new_lines(value):
    # In these texts `\n` written as two characters (as `dvc exp run -S` passes it) means a new line.
    return value.replace("\\n", "\n") if isinstance(value, str) else value


Int = Annotated[int, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
Str = Annotated[str, Field(strict=True)]
Number = Annotated[float, BeforeValidator(_yaml_number), Field(strict=True, allow_inf_nan=False)]
PositiveInt = Annotated[int, must("a positive integer", gt=0)]
PositiveNumber = Annotated[Number, must("a positive number", gt=0)]
Fraction = Annotated[Number, must("between 0 and 1", gt=0, lt=1)]
Share = Annotated[Number, must("in [0, 1)", ge=0, lt=1)]
NonNegative = Annotated[Number, must(">= 0", ge=0)]
Texts = Annotated[list[str], BeforeValidator(_text_list)]
MultilineText = Annotated[Str | None, AfterValidator(_new_lines)]

SOURCES = ("bundled", "local", "gguf", "hub")
TEMPLATES = ("auto", "chat", "plain")
ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output head
# auto, then qlora/tasks.py's TASKS, spelled out: importing them would make every stage that reads params depend
# on the scoring code. tests/test_scoring.py fails when the two differ.
TASKS = ("auto", "classification", "generation", "regression")
BITS = (4, 8, 16)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
# quantize.compute_dtype may also be auto: resolved per machine where the model is loaded (qlora/precision.py)
GGUF_TYPES = ("none", "q8_0", "f16", "bf16", "f32")  # what llama.cpp's converter writes (its --outtype)
LORA_BIASES = ("none", "all", "lora_only")
# How peft initialises the adapter (LoraConfig.init_lora_weights; stages/train.py maps them).
LORA_INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq", "eva")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
# transformers' SchedulerType and OptimizerNames, spelled out: importing them imports torch and
# peft (slow to import), which the light stages (validate, prepare) do not need. tests/test_params.py fails
# when these differ from the installed transformers' own.
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
)
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused",
    "adafactor", "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
    "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
    "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
    "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit",
    "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise",
    "lomo", "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd",
    "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw",
)

SCHEMA = ConfigDict(extra="forbid")


@dataclass(frozen=True, config=SCHEMA)
class Paths:
    raw: Str
    prepared: Str
    tokenized: Str
    base: Str
    tokenizer: Str
    quantized: Str
    adapter: Str
    export: Str
    checkpoints: Str
    metrics: Str


@dataclass(frozen=True, config=SCHEMA)
class Data:
    hub_id: Str | None
    hub_split: Str
    prompt_field: Str | None
    completion_field: Str | None
    messages_field: Str | None
    prompt_template: MultilineText
    labels: Texts
    max_per_label: either(Annotated[int, Field(strict=True, gt=0)], None, what="a positive integer or null")
    max_examples: either(Annotated[int, Field(strict=True, gt=0)], None, what="a positive integer or null")
    bad_rows: choice("error", "drop")
    val_fraction: Fraction
    test_fraction: Fraction
    seed: Int

    @model_validator(mode="after")
    def _fields_and_split(self):
        if not (self.prompt_field or self.prompt_template or self.messages_field):
            raise rule("data.prompt_field", self.prompt_field, "set (or data.prompt_template or data.messages_field)")
        if not (self.completion_field or self.messages_field):
            raise rule("data.completion_field", self.completion_field, "set (or data.messages_field)")
        if self.val_fraction + self.test_fraction >= 1:
            raise rule("data.test_fraction", self.test_fraction,
                       f"small enough to leave training data (val_fraction is {self.val_fraction})")
        return self


@dataclass(frozen=True, config=SCHEMA)
class Base:
    source: choice(*SOURCES)
    path: Str | None
    hub_id: Str | None
    revision: Str | None
    trust_remote_code: Bool

    @model_validator(mode="after")
    def _source_needs(self):
        if self.source == "local" and not self.path:
            raise rule("base.path", self.path, "a model folder when base.source is local")
        if self.source == "gguf" and not (self.path and self.path.endswith(".gguf")):
            raise rule("base.path", self.path, "a .gguf file when base.source is gguf")
        if self.source == "hub" and not self.hub_id:
            raise rule("base.hub_id", self.hub_id, "a hub model id when base.source is hub")
        if self.source == "hub" and not self.revision:
            raise rule("base.revision", self.revision, "a pinned commit hash when base.source is hub")
        return self


@dataclass(frozen=True, config=SCHEMA)
class Tokenize:
    max_length: Annotated[int, must("an integer >= 16", ge=16)]
    template: choice(*TEMPLATES)
    system_prompt: MultilineText


@dataclass(frozen=True, config=SCHEMA)
class Quantize:
    bits: choice(*BITS)
    quant_type: choice(*QUANT_TYPES)
    double_quant: Bool
    compute_dtype: choice("auto", *COMPUTE_DTYPES)
    quant_storage: choice("uint8", *COMPUTE_DTYPES)


@dataclass(frozen=True, config=SCHEMA)
class Lora:
    r: PositiveInt
    alpha: PositiveNumber
    dropout: Share
    target_modules: either(Annotated[list[Str], Field(min_length=1)], Literal["all-linear"],
                           what=f"a non-empty list of module names, or {ALL_LINEAR}")
    bias: choice(*LORA_BIASES)
    use_dora: Bool
    use_rslora: Bool
    init: choice(*LORA_INITS)
    modules_to_save: Annotated[list[Str], must("a list of module names (may be empty)")]

    @model_validator(mode="after")
    def _head_trains(self):
        # TRL's SFTTrainer scores the loss through a fused LM head that multiplies by lm_head.weight itself,
        # past any LoRA wrapped around the head: its A and B would get no gradient and stay as initialised.
        if isinstance(self.target_modules, list) and "lm_head" in self.target_modules:
            raise rule("lora.target_modules", self.target_modules,
                       "layers other than lm_head: the trainer's fused loss reads the head's weight directly, so a "
                       "LoRA on it would never train; put lm_head in lora.modules_to_save to train the head in full")
        return self


@dataclass(frozen=True, config=SCHEMA)
class Train:
    epochs: PositiveNumber
    max_steps: Annotated[int, must("-1 or a positive integer", ge=-1), AfterValidator(nonzero)]
    batch_size: PositiveInt
    gradient_accumulation_steps: PositiveInt
    learning_rate: Fraction
    lr_scheduler: choice(*SCHEDULERS)
    warmup_ratio: Share
    optimizer: choice(*OPTIMIZERS)
    weight_decay: NonNegative
    max_grad_norm: PositiveNumber
    gradient_checkpointing: either(Bool, Literal["auto"], what="auto, true or false")
    gradient_checkpointing_every: either(Annotated[int, Field(strict=True, gt=0)], Literal["auto"],
                                         what="auto or a positive integer")
    attn_implementation: choice(*ATTN_IMPLEMENTATIONS)
    group_by_length: Bool
    padding_free: Bool
    micro_batch_tokens: either(Annotated[int, Field(strict=True, ge=0)], Literal["auto"],
                               what="auto, 0 (off) or a number of tokens")
    liger_kernel: either(Bool, Literal["auto"], what="auto, true or false")
    compile: either(Bool, Literal["auto"], what="auto, true or false")
    activation_offloading: Bool
    processes: PositiveInt
    distributed: Annotated[Str, must("the name of a config in accelerate/ (ddp, fsdp, or one of yours)",
                                     min_length=1, pattern=r"^[^/]+$")]
    logging_steps: PositiveInt
    eval_steps: PositiveInt
    early_stopping_patience: Annotated[int, must("0 (off) or a positive integer", ge=0)]
    early_stopping_min_delta: NonNegative
    checkpoint_steps: Annotated[int, must("0 (off) or a positive integer", ge=0)]
    seed: Int
    trial: either(Annotated[Str, Field(pattern=r"^[\w-]+/\d+$")], None,
                  what="null, or the Optuna trial <study>/<number> this run reports to (set by the tune worker)")


@dataclass(frozen=True, config=SCHEMA)
class Evaluate:
    task: choice(*TASKS)
    batch_size: either(Annotated[int, Field(strict=True, gt=0)], Literal["auto"], what="auto or a positive integer")
    max_new_tokens: either(Annotated[int, Field(strict=True, gt=0)], Literal["auto"], what="auto or a positive integer")
    overfitting_rise_pct: NonNegative
    samples: Annotated[int, must("0 or a positive integer", ge=0)]


@dataclass(frozen=True, config=SCHEMA)
class Export:
    dtype: choice("auto", *COMPUTE_DTYPES)
    check_examples: PositiveInt
    loss_tolerance: PositiveNumber
    metric_tolerance: Annotated[Number, must("in [0, 1]", ge=0, le=1)]
    gguf: choice(*GGUF_TYPES)
    when: choice("always", "on_demand")


@dataclass(frozen=True, config=SCHEMA)
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

    @model_validator(mode="after")
    def _init_fits_base(self):
        init, bits = self.lora.init, self.quantize.bits
        if init == "pissa" and bits != 16:
            raise rule("lora.init", init, f"an init that works on a {bits}-bit base: pissa takes A and B from the "
                       "SVD of the full-precision weights and keeps their residual as the base, which peft cannot "
                       "do on quantized ones (set quantize.bits: 16, or lora.init: olora, which re-quantizes)")
        budget = self.train.micro_batch_tokens
        if budget != "auto" and 0 < budget < self.tokenize.max_length:
            raise rule("train.micro_batch_tokens", budget, f"0 (off), auto, or at least tokenize.max_length "
                       f"({self.tokenize.max_length}): a micro-batch holds whole examples")
        if init == "loftq" and bits != 4:
            raise rule("lora.init", init, f"an init for this base: loftq offsets the 4-bit quantization error, and "
                       f"quantize.bits is {bits}")
        return self


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
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping, got {raw!r}")
    try:
        return Params(**raw)
    except ValidationError as err:
        raise ParamsError(f"{path}: {explain(err.errors()[0])}") from None


TYPE_WORDS = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
              "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
              "bool_parsing": "true or false", "string_type": "a string"}


def explain(error):
    """One pydantic error in this file's words: `<key> must be <what>, got <value>`."""
    if error["type"] == "params":  # a rule across keys
        return error["msg"]
    cls, key, field = Params, [], None
    for part in error["loc"]:  # field names, then (in a union) the branch tried
        fields = getattr(cls, "__pydantic_fields__", {})
        if part not in fields and error["type"] not in ("unexpected_keyword_argument", "missing", "missing_argument"):
            break
        key.append(str(part))
        field = fields.get(part)
        cls = field.annotation if field else None
    name = ".".join(key)
    if error["type"] == "unexpected_keyword_argument":
        known = ", ".join(getattr(_section(key[:-1]), "__pydantic_fields__", {}))
        return f"unknown key {name} (known: {known})"
    if error["type"] in ("missing", "missing_argument"):
        return f"missing key {name}"
    if error["type"] == "dataclass_type":
        return f"{name} must be a mapping, got {error['input']!r}"
    what = (field.json_schema_extra or {}).get("must") if field else None
    kind = TYPE_WORDS.get(error["type"])
    union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType) if field else False
    if error["type"] == "value_error":
        what = str(error["ctx"]["error"])
    elif kind and not (what and union):  # a union's phrase names every type it takes
        what = kind
    return f"{name} must be {what or error['msg']}, got {error['input']!r}"


def _section(key):
    cls = Params
    for part in key:
        cls = cls.__pydantic_fields__[part].annotation
    return cls


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

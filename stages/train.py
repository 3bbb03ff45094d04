"""Train LoRA adapters on the quantized model with peft and TRL's SFTTrainer.

The base weights stay frozen (and 4- or 8-bit); only the low-rank A and B matrices
beside `lora.target_modules` learn. Every hyperparameter comes from params.yaml
(`lora.*`, `train.*`); the adapter is saved as safetensors.

The val loss is measured before the first step and every `train.eval_steps`; the
curves (train and val loss, learning rate, grad norm, tokens/s) go through dvclive
into `metrics/live`, at the trainer's optimizer step so that train and val share an
x axis. With `train.early_stopping_patience` set, training stops when the val loss
stops improving and the saved adapter is the best one, not the last.

With `train.checkpoint_steps` set, a resumable checkpoint is saved every that many
steps under `paths.checkpoints/<run fingerprint>` (qlora/checkpoints.py); a killed
run, rerun with the same params and data, resumes from the newest complete one, curves
included, and the folder is removed once the adapter is written. A non-finite loss
stops training at once with a non-zero exit; nothing is written as if it succeeded.
"""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qlora.checkpoints import fingerprint, live_snapshot_callback, newest_complete, restore_live, step_of
from qlora import cores, cost, trial
from qlora.console import done, note, progress, quiet_known_noise
from qlora.lean import keep_less_for_backward
from qlora.models import (device, fast_lora_dropout, head_grads_upcast_in_slices, load_model, module_names,
                          score_labelled_positions_only)
from qlora.outputs import RUN_RECORD, atomic_dir, log, write_json
from qlora.params import ParamsError, load_params
from qlora.precision import resolve
from qlora.splits import load_split

LIVE_DIR = "live"  # under paths.metrics: dvclive's curves, declared as plots in dvc.yaml
VAL_CURVE = "plots/metrics/eval/loss.tsv"  # under LIVE_DIR: the val curve plotted, copied into the adapter's RUN_RECORD
PARAMS = ["lora", "train", "quantize.compute_dtype", "paths.base", "paths.quantized", "paths.tokenizer",
          "paths.tokenized", "paths.adapter", "paths.checkpoints", "paths.metrics"]


# lora.init as peft's LoraConfig.init_lora_weights. kaiming is peft's own default (True): A
# Kaiming-uniform, B zero. LoftQ and EVA are computed after the model is built (initialise_lora).
LORA_INIT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True,
             "eva": "eva"}


def lora_config(lo):
    from peft import EvaConfig, LoraConfig

    # EVA over every token a layer sees (the prompt too): the answer tokens alone, a few per example,
    # are too few for its SVD at batch sizes that fit on a CPU.
    eva = EvaConfig(use_label_mask=False) if lo.init == "eva" else None
    return LoraConfig(
        eva_config=eva,
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=lo.target_modules,
        bias=lo.bias,
        use_dora=lo.use_dora,
        use_rslora=lo.use_rslora,
        init_lora_weights=LORA_INIT[lo.init],
        modules_to_save=lo.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def initialise_lora(trainer, p):
    """The initialisations peft computes on the built model: LoftQ from the unquantized weights
    (models/base), so that base + adapter starts closer to them than the 4-bit base alone; EVA
    from the singular vectors of each layer's inputs over the train data."""
    if p.lora.init == "loftq":
        from peft import replace_lora_weights_loftq

        if device() != "cuda":
            raise ParamsError("params.yaml: lora.init loftq needs a CUDA GPU: peft computes LoftQ for an already "
                              "quantized base on CUDA only (peft.replace_lora_weights_loftq). On this machine use "
                              "kaiming, gaussian, olora or eva")

        weights = Path(p.paths.base) / "model.safetensors"
        if not weights.exists():
            raise ParamsError(f"params.yaml: lora.init loftq reads the unquantized weights from one file, {weights}, "
                              f"which does not exist (a sharded base model is not supported)")
        replace_lora_weights_loftq(trainer.model, model_path=str(weights))
    elif p.lora.init == "eva":
        from peft import initialize_lora_eva_weights

        batches = trainer.get_train_dataloader()
        limit = EVA_PASSES * len(batches)

        def forward(model, inputs):  # peft cycles the data until every layer's components converge
            forward.calls += 1
            if forward.calls > limit:
                raise ParamsError(f"params.yaml: lora.init eva: the SVD of the layers' inputs did not settle in "
                                  f"{EVA_PASSES} passes over the train split ({limit} batches). Lower lora.r "
                                  f"({p.lora.r}), or use another init")
            return model(**{k: v for k, v in inputs.items() if k != "labels"})

        forward.calls = 0
        initialize_lora_eva_weights(trainer.model, dataloader=batches, forward_fn=forward, show_progress_bar=False)


EAGER_UP_TO = 160  # tokens: about where sdpa's CPU attention fwd+bwd overtakes eager's (batch 8, SmolLM2 heads)


def attention(t, train_set):
    """train.attn_implementation, with `auto` resolved: eager on CPU for short examples, whose backward
    is faster than sdpa's there (benchmarks/results/levers.json, `variants["sdpa attention"]`), sdpa on longer ones;
    on a GPU, FlashAttention 2's variable-length kernels for packed micro-batches where flash-attn is
    installed, sdpa otherwise. Packed rows (train.micro_batch_tokens) are as long as the budget: sdpa.
    Either way attention stays within each example of a packed row: transformers reads the example
    boundaries from the restarting position ids (a block-diagonal mask for eager and sdpa)."""
    if t.attn_implementation != "auto":
        return t.attn_implementation
    packed = micro_batch_tokens(t, train_set) > 0
    if device() == "cuda":
        return "flash_attention_2" if packed and importlib.util.find_spec("flash_attn") else "sdpa"
    longest = max(map(len, train_set["input_ids"]))
    return "eager" if longest <= EAGER_UP_TO and not packed else "sdpa"


GPU_MICRO_BATCH_TOKENS = 16384  # auto on a GPU: enough tokens per micro-step that the matmuls, not the 4-bit
# dequantization or the launches, take the step (an 8B model's weights are dequantized once per micro-step)


def mean_tokens(train_set):
    """Tokens per example, of examples or of TRL's packed rows (whose `seq_lengths` are the examples')."""
    if "seq_lengths" in getattr(train_set, "column_names", ()):
        lengths = [n for row in train_set["seq_lengths"] for n in row]
    else:
        lengths = [len(ids) for ids in train_set["input_ids"]]
    return sum(lengths) / len(lengths)


def micro_batch_tokens(t, train_set):
    """train.micro_batch_tokens, with `auto` resolved: on a GPU, GPU_MICRO_BATCH_TOKENS when the global
    batch holds more tokens than that (at least the longest example); otherwise 0, batches of
    train.batch_size examples as before: on CPU the padded batches measured faster than padding-free
    ones (benchmarks/results/levers.json, `variants["padding-free"]`), and a global batch within one
    budget gains only its padding."""
    if t.micro_batch_tokens != "auto":
        return t.micro_batch_tokens
    if device() == "cpu":
        return 0
    tokens = t.batch_size * t.gradient_accumulation_steps * mean_tokens(train_set)
    return max(GPU_MICRO_BATCH_TOKENS, max(map(len, train_set["input_ids"]))) if tokens > GPU_MICRO_BATCH_TOKENS else 0


def batching(t, train_set):
    """(examples or packed rows per micro-batch, micro-batches per optimizer step, row length or None).

    Without a token budget: train.batch_size examples, train.gradient_accumulation_steps of them. With
    one, TRL packs whole examples into rows of at most that many tokens (best-fit decreasing, no
    example split), one row per micro-batch, and accumulates as many rows as hold the global batch of
    batch_size * gradient_accumulation_steps examples on average (at least one row)."""
    budget = micro_batch_tokens(t, train_set)
    if not budget:
        return t.batch_size, t.gradient_accumulation_steps, None
    global_batch = t.batch_size * t.gradient_accumulation_steps
    return 1, max(1, round(global_batch * mean_tokens(train_set) / budget)), budget


def liger(t):
    """train.liger_kernel, with `auto` resolved: on on a GPU where liger-kernel is installed. TRL applies
    its RMSNorm, SwiGLU and RoPE kernels (not its fused cross-entropy: TRL's own fused LM head scores the
    loss). Liger's kernels are Triton's: asked for elsewhere, the stage stops with what to set."""
    installed = importlib.util.find_spec("liger_kernel") is not None
    if t.liger_kernel == "auto":
        return device() == "cuda" and installed
    if t.liger_kernel and (device() != "cuda" or not installed):
        raise ParamsError("params.yaml: train.liger_kernel true needs a CUDA GPU and the liger-kernel package "
                          f"({'not installed' if not installed else 'no GPU here'}); set it to auto or false")
    return t.liger_kernel


def offloading(t):
    """train.activation_offloading, refused without CUDA: TRL's offloading copies to pinned host memory
    on a CUDA stream; on CPU the activations are in host memory already."""
    if t.activation_offloading and device() != "cuda":
        raise ParamsError("params.yaml: train.activation_offloading true needs a CUDA GPU (on CPU the activations "
                          "are in RAM already); set it to false, or train.gradient_checkpointing: true to save memory")
    return t.activation_offloading


def compiling(t):
    """train.compile, with `auto` resolved: on a GPU with torch >= 2.8, where torch.compile traces
    bitsandbytes' 4-bit layers whole; off on CPU, where compiling costs more than the run saves."""
    if t.compile != "auto":
        return t.compile
    import torch

    return device() == "cuda" and tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)


def compile_layers(model):
    """torch.compile each decoder layer in place (Module.compile); returns how many. Layer by layer, as
    the layers are alike: one compiled graph serves them all, the embeddings, head and loss stay eager."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile()
    return len(layers)


def checkpointing(t):
    """train.gradient_checkpointing, with `auto` resolved: on a GPU, where memory is what limits the model, the
    batch and the length; off on CPU, where the recompute costs the most time and the layers keep less for
    their backward (qlora/lean.py): the default step without it peaks under `trl sft`'s with it
    (benchmarks/README.md; what it costs and saves: docs/levers.md)."""
    if t.gradient_checkpointing != "auto":
        return t.gradient_checkpointing
    return device() != "cpu"


def checkpointing_every(t):
    """train.gradient_checkpointing_every, with `auto` resolved: every layer on a GPU, where memory is what
    limits the model, the batch and the length; every 2nd on CPU, where the recompute costs more time and
    RAM is seldom short (what each costs and saves on the default: docs/levers.md)."""
    if t.gradient_checkpointing_every != "auto":
        return t.gradient_checkpointing_every
    return 2 if device() == "cpu" else 1


def save_steps(t):
    """Steps between checkpoints. With early stopping the best adapter must be the one of the best
    evaluation, and the Trainer keeps it only if a checkpoint was taken there: one at every
    evaluation, then, whatever checkpoint_steps says."""
    if t.early_stopping_patience or not t.checkpoint_steps:
        return t.eval_steps
    return t.checkpoint_steps


def sft_config(t, output_dir, bf16, fp16, resuming=False, train_set=None):
    import torch
    from trl import SFTConfig

    per_device, accumulation, row = batching(t, train_set) if train_set is not None else \
        (t.batch_size, t.gradient_accumulation_steps, None)
    early_stopping = t.early_stopping_patience > 0
    checkpoints = t.checkpoint_steps > 0
    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a share of all steps
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        activation_checkpointing=checkpointing(t),
        activation_checkpointing_kwargs={"every_n_layers": checkpointing_every(t)},
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        padding_free=t.padding_free or bool(row),
        packing=bool(row),  # train.micro_batch_tokens: whole examples in rows of `row` tokens, best-fit decreasing
        packing_strategy="bfd",
        eval_packing=False,  # the val loss over the same batches of examples, whatever the train batching
        use_liger_kernel=liger(t),
        activation_offloading=offloading(t),
        logging_steps=t.logging_steps,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        # The val curve starts at the untrained adapter (the base model). Not again on a resume: that
        # point is already on the restored curve, and the extra pass would shift the RNG stream.
        eval_on_start=not resuming,
        per_device_eval_batch_size=t.batch_size,
        # Resumable checkpoints (full state) every checkpoint_steps; without them, early stopping
        # still needs the adapter at each evaluation to keep the best one.
        save_strategy="steps" if checkpoints or early_stopping else "no",
        save_steps=save_steps(t),
        save_total_limit=2 if early_stopping else 1,  # the newest, and the best when it is another
        save_only_model=not checkpoints,
        logging_nan_inf_filter=False,  # a NaN loss must reach the log (and stop the run), not be averaged away
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        max_length=row,  # None: the tokenize stage already cut examples to tokenize.max_length
        report_to="none",
        disable_tqdm=False,  # a progress bar, though not the stock one: see progress_callback
        dataloader_num_workers=0,
    )


def tokens_per_second_callback():
    """Adds `tokens_per_second` to each training log: non-padding tokens over the time spent in
    optimizer steps since the previous log (evaluation time excluded), before dvclive reads it."""
    from transformers import TrainerCallback

    class TokensPerSecond(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.seconds, self.started, self.start_tokens = 0.0, None, None
            self.training_seconds = 0.0  # this process's part of the run, evaluations excluded

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            if self.start_tokens is None:  # after a resume, the Trainer has restored its state by now
                self.start_tokens = self.tokens = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self.started
            self.seconds += elapsed
            self.training_seconds += elapsed

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "loss" not in logs or not self.seconds:
                return
            logs["tokens_per_second"] = round((state.num_input_tokens_seen - self.tokens) / self.seconds, 1)
            self.tokens, self.seconds = state.num_input_tokens_seen, 0.0

    return TokensPerSecond()


def mean_logged_loss(log_history):
    """The train loss averaged over every optimizer step of the run, from the logged windows
    (the Trainer's own `training_loss` covers only this process's steps after a resume)."""
    total = previous = 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    return total / previous


def last_step_callback():
    """Logs and evaluates at the last optimizer step too, whatever logging_steps and eval_steps say:
    a short run (max_steps 4, logging every 5) still has a loss to report, and the val curve ends
    where training ended."""
    from transformers import TrainerCallback

    class LastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = control.should_evaluate = True

    return LastStep()


def finite_loss_callback():
    """Stops the run at the first logged non-finite loss or grad norm (the stock Trainer goes on)."""
    from transformers import TrainerCallback

    class FiniteLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            bad = {k: v for k, v in (logs or {}).items() if k in ("loss", "grad_norm", "eval_loss")
                   and isinstance(v, float) and not math.isfinite(v)}
            if bad:
                raise FloatingPointError(
                    f"train: {', '.join(f'{k} = {v}' for k, v in bad.items())} at step {state.global_step}; "
                    "training stopped, no adapter or metrics written. Lower train.learning_rate, "
                    "keep train.max_grad_norm set, or check the data.")

    return FiniteLoss()


def progress_callback():
    """The Trainer's progress for a person, in place of transformers' ProgressCallback, which prints
    each log as a raw dict: a bar of optimizer steps with the rate, the time left and the latest
    train loss, learning rate and tokens/s beside it; at each evaluation a line with the train and
    val loss side by side, so that overfitting shows in the console as it does in the curves."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        bar = val_bar = train_loss = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # the state is restored by now: a resumed run starts part way
                self.bar = progress(state.max_steps, "train", unit="step", initial=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if self.bar is None:
                return
            if self.val_bar is None:
                self.val_bar = progress(len(eval_dataloader), "val loss", unit="batch", leave=False)
            self.val_bar.update()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is None or not logs:
                return
            if "loss" in logs:
                self.train_loss = logs["loss"]
                shown = [f"loss {logs['loss']:.4g}", f"lr {logs.get('learning_rate', 0):.2g}"]
                if "tokens_per_second" in logs:
                    shown.append(f"{logs['tokens_per_second']:.0f} tokens/s")
                self.bar.set_postfix_str(", ".join(shown), refresh=False)  # shown at the next refresh
            if "eval_loss" in logs:
                if self.val_bar is not None:
                    self.val_bar.close()
                    self.val_bar = None
                train = "before training" if self.train_loss is None else f"train loss {self.train_loss:.4g}"
                note(f"step {state.global_step}/{state.max_steps}: {train}, val loss {logs['eval_loss']:.4g}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Progress()


def live_callback(folder, resume=False):
    """dvclive's Trainer callback, logging at the optimizer step; it never writes dvc.yaml."""
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    class StepAligned(DVCLiveCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "train_loss" in logs:  # the end-of-run summary goes to train.json
                return
            self.live.step = state.global_step
            # dvclive files eval_* under eval/; training values go under train/ beside them. Epoch is
            # step / steps per epoch; the Trainer's cumulative runtime figures are left out.
            logs = {k if k.startswith("eval_") else f"train_{k}": v for k, v in logs.items()
                    if k not in ("epoch", "train_runtime", "train_tokens_per_second")}
            super().on_log(args, state, control, logs=logs, **kwargs)

    live = Live(str(folder), dvcyaml=False, save_dvc_exp=False, report=None, resume=resume)
    return StepAligned(live=live)


def build_trainer(p, output_dir, callbacks=(), resuming=False):
    """The SFTTrainer of params `p` (the stage's, or a benchmark's): quantized model, LoRA, data."""
    import torch
    from transformers import AutoTokenizer, ProgressCallback, set_seed
    from trl import SFTTrainer

    if p.lora.init == "loftq" and device() != "cuda":
        initialise_lora(None, p)  # its error, before the model is loaded
    liger(p.train)  # theirs too
    offloading(p.train)
    set_seed(p.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(p.paths.tokenizer)
    model = load_model(p.paths.quantized, p.quantize.compute_dtype)  # 4-bit layers off the AVX512-BF16 trap
    targets = p.lora.target_modules  # a list of names, or all-linear (peft finds them)
    missing = sorted(set(targets) - module_names(model)) if isinstance(targets, list) else []
    if missing:
        raise ParamsError(f"params.yaml: lora.target_modules names {missing[0]!r}, which the model does not have "
                          f"(it has: {', '.join(sorted(module_names(model)))})")
    # No peft.prepare_model_for_kbit_training: it upcasts every non-quantized weight (embeddings, norms,
    # 28M of SmolLM2's 135M) to float32, which autocast then casts back to bf16 at each use: slower
    # per step, and more memory. The weights stay in their stored dtype, as `trl sft` keeps them (computing
    # in float32, qlora/precision.py); the Trainer enables input gradients itself when gradient
    # checkpointing is on.
    train_set = load_split(p.paths.tokenized, "train")
    model.set_attn_implementation(attention(p.train, train_set))
    # Autocast to the compute dtype, quantize.compute_dtype as resolved here; float16 trains with loss scaling.
    bf16 = model.compute_precision.dtype == "bfloat16"
    fp16 = model.compute_precision.dtype == "float16" and torch.cuda.is_available()  # no fp16 autocast on CPU
    score_labelled_positions_only()
    head_grads_upcast_in_slices()
    trainer = SFTTrainer(
        model=model,
        args=sft_config(p.train, str(output_dir), bf16, fp16, resuming=resuming, train_set=train_set),
        train_dataset=train_set,
        eval_dataset=load_split(p.paths.tokenized, "val"),
        processing_class=tokenizer,
        peft_config=lora_config(p.lora),
        callbacks=list(callbacks),
    )
    initialise_lora(trainer, p)
    fast_lora_dropout(trainer.model)  # the same dropout, its masks drawn faster on CPU
    keep_less_for_backward(trainer.model)  # the same gradients, less kept for the backward on CPU: qlora/lean.py
    if compiling(p.train):
        compile_layers(trainer.model)
    trainer.remove_callback(ProgressCallback)  # it prints every log as a dict; progress_callback reads better
    trainer.add_callback(progress_callback())  # last, as the stock one: it shows the tokens/s added before it
    return trainer


def is_launched():
    """Whether this process was started by `accelerate launch` (or torchrun): it has a rank."""
    return "LOCAL_RANK" in os.environ


def is_main_process():
    return int(os.environ.get("RANK", "0")) == 0


def launch(p):
    """Run this stage as `train.processes` processes through `accelerate launch` with the config
    accelerate/<train.distributed>.yaml; returns their exit status. Without a main_process_port in
    the config, a free one is taken, so queued experiments can train side by side. On a machine
    without CUDA the processes train on CPU over gloo."""
    import socket

    import torch
    import yaml

    t = p.train
    config_file = Path(__file__).resolve().parents[1] / "accelerate" / f"{t.distributed}.yaml"
    if not config_file.exists():
        raise ParamsError(f"params.yaml: train.distributed is {t.distributed!r}, but {config_file} does not exist "
                          f"(there: {', '.join(sorted(f.stem for f in config_file.parent.glob('*.yaml')))})")
    config = yaml.safe_load(config_file.read_text())
    if config.get("distributed_type") == "FSDP":
        if not torch.cuda.is_available():
            raise ParamsError(f"params.yaml: train.distributed {t.distributed} is FSDP, which needs CUDA GPUs; "
                              "on CPU use ddp")
        q = json.loads((Path(p.paths.quantized) / "config.json").read_text()).get("quantization_config", {})
        if q.get("load_in_4bit") and q.get("bnb_4bit_quant_storage") != q.get("bnb_4bit_compute_dtype"):
            raise ParamsError(
                f"params.yaml: FSDP shards 4-bit weights only when quantize.quant_storage equals "
                f"quantize.compute_dtype; {p.paths.quantized} stores {q.get('bnb_4bit_quant_storage')} with "
                f"compute dtype {q.get('bnb_4bit_compute_dtype')}")
    elif torch.cuda.is_available() and torch.cuda.device_count() < t.processes and config.get("num_machines", 1) == 1:
        raise ParamsError(f"params.yaml: train.processes is {t.processes}, but {torch.cuda.device_count()} GPU(s) "
                          "are visible (CUDA_VISIBLE_DEVICES)")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config_file),
           "--num_processes", str(t.processes)]
    if not config.get("main_process_port"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            cmd += ["--main_process_port", str(s.getsockname()[1])]
    cmd += ["-m", "stages.train"]
    log(f"{t.processes} processes ({t.distributed}): {' '.join(cmd[1:])}")
    return subprocess.run(cmd).returncode


EVA_PASSES = 3  # lora.init eva: passes over the train split before its SVD must have converged
MUTATING_INITS = ("pissa", "olora")  # they move part of each weight into A and B: the base they train on differs


def save_initial(trainer, p, folder):
    """PiSSA and OLoRA change the base weights they start from; the adapter they start with, kept
    here, lets save_pretrained write the trained one as a plain LoRA of the unchanged base (rank
    2r), which evaluate and export load. None for the other inits."""
    if p.lora.init not in MUTATING_INITS:
        return None
    config = trainer.model.peft_config["default"]
    config.init_lora_weights = True  # saved as a plain LoRA adapter, as peft's conversion expects
    trainer.model.save_pretrained(folder)
    config.init_lora_weights = LORA_INIT[p.lora.init]
    return folder


def stage_callbacks(p, live_dir, resume, main_process):
    throughput = tokens_per_second_callback()
    callbacks = [last_step_callback(), finite_loss_callback(), throughput, cores.rebalance_callback()]
    if main_process:  # only the main process writes curves; the others never touch metrics/
        callbacks.append(live_callback(live_dir, resume=bool(resume)))
        if p.train.checkpoint_steps:
            callbacks.append(live_snapshot_callback(live_dir))
    if p.train.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(p.train.early_stopping_patience, p.train.early_stopping_min_delta))
    pruning = trial.pruning_callback(p.train.trial) if p.train.trial and main_process else None
    return callbacks + [pruning] * bool(pruning), throughput, pruning


def run(trainer, p, resume):
    """Train; returns the wall seconds. Out of memory stops with the levers that lower it."""
    import torch

    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not isinstance(err, torch.OutOfMemoryError) and "can't allocate memory" not in str(err):
            raise
        raise SystemExit(
            f"train: out of memory ({str(err).splitlines()[0][:200]}). Levers, in params.yaml: lower "
            f"train.batch_size ({p.train.batch_size}) and raise train.gradient_accumulation_steps "
            f"({p.train.gradient_accumulation_steps}) to keep the effective batch; lower tokenize.max_length; "
            f"set train.gradient_checkpointing: true ({p.train.gradient_checkpointing}, here "
            f"{'on' if checkpointing(p.train) else 'off'}); 4-bit "
            f"quantize.bits. Checkpoints so far are kept: the rerun resumes.") from None
    if not any("loss" in h for h in trainer.state.log_history):
        raise SystemExit("train: no training step was logged; no adapter written. Check train.max_steps, "
                         "train.logging_steps and the size of the train split.")
    return time.perf_counter() - start


def write_adapter(trainer, p, run_dir, initial, main_process):
    if trainer.is_fsdp_enabled:
        # Sharded adapters are gathered by every process (peft's FSDP recipe); the main one writes.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(run_dir / "final"))
    if main_process:
        with atomic_dir(p.paths.adapter) as out:
            if trainer.is_fsdp_enabled:
                for name in ("adapter_model.safetensors", "adapter_config.json"):
                    shutil.copy(run_dir / "final" / name, out / name)
            else:
                trainer.model.save_pretrained(out, path_initial_model_for_weight_conversion=initial)
    trainer.accelerator.wait_for_everyone()


def train_metrics(trainer, throughput, seconds, resume, trainable, total, p, pruning=None):
    state, world = trainer.state, trainer.accelerator
    history = [h["loss"] for h in state.log_history if "loss" in h]  # all finite: see FiniteLoss
    tokens = state.num_input_tokens_seen - throughput.start_tokens
    tokens_per_second = tokens / throughput.training_seconds
    low, high = cores.threads_used()
    precision = resolve(p.quantize.compute_dtype, device())  # as load_model resolved it (once a process)
    return dict(
        **precision.record(),  # quantize.compute_dtype as resolved on this machine, and why
        trainable_parameters=trainable,
        trainable_fraction=round(trainable / total, 6),
        mean_loss=round(mean_logged_loss(state.log_history), 4),  # the whole run; evaluate.json has train_loss
        final_loss=round(history[-1], 4),
        steps=state.global_step,
        epochs=round(state.epoch, 3),
        seconds=round(seconds, 1),  # wall time of training in this process, evaluations included
        tokens_per_second=round(tokens_per_second, 1),  # non-padding, evaluations excluded
        mfu=cost.mfu(trainer.model.config, mean_tokens(trainer.train_dataset), trainable, tokens_per_second,
                     high * world.num_processes, precision.dtype),  # over the peak of that dtype on these kernels
        peak_memory_mb=cost.peak_memory_mb(),  # this process: peak RSS on CPU, the most allocated on CUDA
        stopped_early=state.global_step < state.max_steps,
        pruned=bool(pruning and pruning.pruned_at is not None),  # stopped by its study's pruner (train.trial)
        stopped_at_step=state.global_step,
        best_step=state.best_global_step if p.train.early_stopping_patience else state.global_step,
        resumed_from_step=step_of(resume) if resume else 0,
        attention=trainer.model.config._attn_implementation,  # train.attn_implementation, auto resolved
        checkpointing=checkpointing(p.train),  # train.gradient_checkpointing, auto resolved
        checkpointing_every=checkpointing_every(p.train) if checkpointing(p.train) else 0,  # 0: off
        micro_batch_tokens=trainer.args.max_length if trainer.args.packing else 0,  # auto resolved; 0: off
        gradient_accumulation_steps=trainer.args.gradient_accumulation_steps,  # resolved with a token budget
        liger_kernel=trainer.args.use_liger_kernel,
        compiled=compiling(p.train),
        threads=low if low == high else f"{low}-{high}",  # CPU threads: the fair share of the cores (qlora.cores)
    ), history


def main():
    quiet_known_noise()  # before bitsandbytes is imported
    p = load_params(PARAMS)
    if p.train.processes > 1 and not is_launched():
        raise SystemExit(launch(p))
    cores.claim()  # its share of the cores, with other stages (or the other ranks) running at once
    main_process = is_main_process()
    live_dir = Path(p.paths.metrics) / LIVE_DIR
    # Several processes share one output folder (each saves its RNG state there), so it cannot be a
    # per-process temporary folder.
    shared = p.train.checkpoint_steps or p.train.processes > 1
    run_dir = Path(p.paths.checkpoints) / fingerprint(p) if shared else None
    resume = newest_complete(run_dir) if p.train.checkpoint_steps else None
    if resume and main_process:
        restore_live(resume, live_dir)
        log(f"resuming from {resume} (step {step_of(resume)} of a run with the same params and data)")
    callbacks, throughput, pruning = stage_callbacks(p, live_dir, resume, main_process)

    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(p, run_dir or scratch, callbacks, resuming=bool(resume))
        initial = save_initial(trainer, p, Path(scratch) / "initial-adapter")
        world = trainer.accelerator
        if main_process and world.num_processes > 1:
            log(f"world of {world.num_processes} processes ({world.distributed_type.value}), "
                f"global batch {p.train.batch_size * p.train.gradient_accumulation_steps * world.num_processes}")
        trainable, total = trainer.model.get_nb_trainable_parameters()
        log(f"{trainable} trainable parameters of {total} ({100 * trainable / total:.3f}%), "
            f"{len(trainer.train_dataset)} {'packed rows' if trainer.args.packing else 'examples'}")
        seconds = run(trainer, p, resume)
        write_adapter(trainer, p, run_dir, initial, main_process)
    if not main_process:
        return  # the main process writes the adapter and metrics, once
    if run_dir and run_dir.exists():
        shutil.rmtree(run_dir)  # the adapter is written: DVC keeps it from here

    metrics, history = train_metrics(trainer, throughput, seconds, resume, trainable, total, p, pruning)
    write_json(Path(p.paths.metrics) / "train.json", metrics)
    import pandas as pd

    val = pd.read_csv(live_dir / VAL_CURVE, sep="\t")[["step", "loss"]]  # the curve dvc.yaml plots
    write_json(Path(p.paths.adapter) / RUN_RECORD, dict(metrics, val_curve=val.to_dict("records")))
    done(f"{metrics['steps']} steps in {seconds:.0f} s ({throughput.training_seconds:.0f} s of them training), "
         f"loss {history[0]:.3f} -> {history[-1]:.3f}, {metrics['tokens_per_second']} tokens/s"
         + (f" (pruned by its study at step {pruning.pruned_at})" if metrics["pruned"] else
            f" (stopped early; best val loss at step {metrics['best_step']})" if metrics["stopped_early"] else ""))


if __name__ == "__main__":
    main()

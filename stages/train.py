"""Train LoRA adapters on the quantized model with peft and TRL's SFTTrainer.

The base weights stay frozen (and 4- or 8-bit); only the low-rank A and B matrices
beside `lora.target_modules` learn. Every hyperparameter comes from params.yaml
(`lora.*`, `train.*`); the adapter is saved as safetensors.

The val loss is measured before the first step and every `train.eval_steps`; the
curves (train and val loss, learning rate, grad norm, tokens/s) go through dvclive
into `metrics/live`, at the trainer's optimizer step so that train and val share an
x axis. With `train.early_stopping_patience` set, training stops when the val loss
stops improving and the saved adapter is the best one, not the last.
"""

import math
import tempfile
import time
from pathlib import Path

from qlora.models import is_quantized, keep_4bit_weights_trainable, load_model, module_names
from qlora.outputs import atomic_dir, log, write_json
from qlora.params import ParamsError, load_params
from qlora.splits import load_split

LIVE_DIR = "live"  # under paths.metrics: dvclive's curves, declared as plots in dvc.yaml
PARAMS = ["lora", "train", "paths.quantized", "paths.tokenizer", "paths.tokenized", "paths.adapter", "paths.metrics"]


def lora_config(lo):
    from peft import LoraConfig

    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=lo.target_modules,
        bias=lo.bias,
        task_type="CAUSAL_LM",
    )


def sft_config(t, output_dir, bf16, fp16):
    import torch
    from trl import SFTConfig

    early_stopping = t.early_stopping_patience > 0
    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a share of all steps
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        activation_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        eval_on_start=True,  # the val curve starts at the untrained adapter (the base model)
        per_device_eval_batch_size=t.batch_size,
        # Early stopping keeps the best adapter: checkpoints (the adapter only) at each evaluation.
        save_strategy="steps" if early_stopping else "no",
        save_steps=t.eval_steps,
        save_total_limit=1,
        save_only_model=True,
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        max_length=None,  # the tokenize stage already cut examples to tokenize.max_length
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def tokens_per_second_callback():
    """Adds `tokens_per_second` to each training log: non-padding tokens over the time spent in
    optimizer steps since the previous log (evaluation time excluded), before dvclive reads it."""
    from transformers import TrainerCallback

    class TokensPerSecond(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.tokens, self.seconds, self.started = state.num_input_tokens_seen, 0.0, None
            self.training_seconds = 0.0  # the whole run, evaluations excluded

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

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


def live_callback(folder):
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

    live = Live(str(folder), dvcyaml=False, save_dvc_exp=False, report=None)
    return StepAligned(live=live)


def main():
    import torch
    from transformers import AutoTokenizer, set_seed
    from trl import SFTTrainer

    p = load_params(PARAMS)
    set_seed(p.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(p.paths.tokenizer)
    train_set = load_split(p.paths.tokenized, "train")
    val_set = load_split(p.paths.tokenized, "val")
    model = load_model(p.paths.quantized)
    missing = sorted(set(p.lora.target_modules) - module_names(model))
    if missing:
        raise ParamsError(f"params.yaml: lora.target_modules names {missing[0]!r}, which the model does not have "
                          f"(it has: {', '.join(sorted(module_names(model)))})")
    keep_4bit_weights_trainable(model)  # the AVX512-BF16 CPU trap: see qlora/models.py
    if is_quantized(model):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=p.train.gradient_checkpointing)

    # The quantize stage stored the model in quantize.compute_dtype; autocast to the same.
    bf16 = model.config.dtype == torch.bfloat16
    fp16 = model.config.dtype == torch.float16 and torch.cuda.is_available()  # no fp16 autocast on CPU
    throughput = tokens_per_second_callback()
    callbacks = [throughput, live_callback(Path(p.paths.metrics) / LIVE_DIR)]
    if p.train.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(p.train.early_stopping_patience, p.train.early_stopping_min_delta))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SFTTrainer(
            model=model,
            args=sft_config(p.train, scratch, bf16, fp16),
            train_dataset=train_set,
            eval_dataset=val_set,
            processing_class=tokenizer,
            peft_config=lora_config(p.lora),
            callbacks=callbacks,
        )
        trainable, total = trainer.model.get_nb_trainable_parameters()
        log(f"{trainable} trainable parameters of {total} ({100 * trainable / total:.3f}%), "
            f"{len(train_set)} examples")
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if not history or not all(math.isfinite(x) for x in history):
            raise SystemExit(f"train: the loss is not finite ({history[-3:]}); no adapter written. "
                             "Lower train.learning_rate or check the data.")

        with atomic_dir(p.paths.adapter) as out:
            trainer.model.save_pretrained(out)

    state = trainer.state
    tokens = state.num_input_tokens_seen or sum(map(len, train_set["input_ids"])) * state.epoch
    planned = state.max_steps
    metrics = dict(
        trainable_parameters=trainable,
        trainable_fraction=round(trainable / total, 6),
        mean_loss=round(result.training_loss, 4),  # over the whole run; evaluate.json has train_loss
        final_loss=round(history[-1], 4),
        steps=trainer.state.global_step,
        epochs=round(trainer.state.epoch, 3),
        seconds=round(seconds, 1),  # wall time of training, evaluations included
        tokens_per_second=round(tokens / throughput.training_seconds, 1),  # non-padding, evaluations excluded
        stopped_early=state.global_step < planned,
        stopped_at_step=state.global_step,
        best_step=state.best_global_step if p.train.early_stopping_patience else state.global_step,
    )
    write_json(Path(p.paths.metrics) / "train.json", metrics)
    log(f"{metrics['steps']} steps in {seconds:.0f}s ({throughput.training_seconds:.0f}s training), "
        f"loss {history[0]:.3f} -> {history[-1]:.3f}, "
        f"{metrics['tokens_per_second']} tokens/s")


if __name__ == "__main__":
    main()

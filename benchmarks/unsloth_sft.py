"""Unsloth's QLoRA fine-tuning of one model on bench_train.py's data, for its comparison (GPU only).

    python benchmarks/unsloth_sft.py --model DIR --data DIR --steps N --pack TOKENS --rows R --params JSON

Unsloth's documented recipe: FastLanguageModel.from_pretrained(load_in_4bit=True), get_peft_model
with its gradient checkpointing ("unsloth"), then TRL's SFTTrainer with packing, bf16 and the same
LoRA, learning rate, schedule, seed and rows of TOKENS as the other tools. It prints the trainer's
logs (loss, train_runtime, num_tokens) as trl sft does, which bench_train.py reads.
"""

import argparse
import json

parser = argparse.ArgumentParser()
for name in ("--model", "--data", "--params"):
    parser.add_argument(name, required=True)
for name in ("--steps", "--pack", "--rows"):
    parser.add_argument(name, type=int, required=True)
args = parser.parse_args()

from unsloth import FastLanguageModel  # noqa: E402  first, as Unsloth asks: it patches transformers and TRL

from datasets import load_dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

params = json.loads(args.params)
lo, t = params["lora"], params["train"]
model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=args.pack or 2048, load_in_4bit=True,
                                                     dtype=None, local_files_only=True)
targets = lo["target_modules"]
if targets == "all-linear":
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = FastLanguageModel.get_peft_model(model, r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                                         target_modules=targets, bias="none", use_gradient_checkpointing="unsloth",
                                         random_state=t["seed"])
trainer = SFTTrainer(
    model=model, processing_class=tokenizer,
    train_dataset=load_dataset(args.data, split="train"),
    args=SFTConfig(output_dir="/tmp/unsloth-out", max_steps=args.steps, logging_steps=1, bf16=True,
                   per_device_train_batch_size=args.rows if args.pack else t["batch_size"],
                   gradient_accumulation_steps=t["gradient_accumulation_steps"], packing=bool(args.pack),
                   max_length=args.pack or params["tokenize"]["max_length"], learning_rate=t["learning_rate"],
                   lr_scheduler_type=t["lr_scheduler"], warmup_steps=t["warmup_ratio"], optim=t["optimizer"],
                   seed=t["seed"], save_strategy="no", report_to="none"),
)
trainer.train()

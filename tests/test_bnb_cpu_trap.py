"""The bitsandbytes CPU trap: an eval pass must not change later LoRA gradients.

On CPUs with AVX512-BF16, a Linear4bit forward in eval mode without grad repacks
its weight for inference and leaves it so; later training steps then get wrong LoRA
gradients, silently. The train stage turns that path off (keep_4bit_weights_trainable);
these tests compare LoRA gradients on one batch before and after an eval pass.
"""

import pytest
import torch

from conftest import tiny_config
from qlora.models import keep_4bit_weights_trainable


@pytest.fixture
def lora_4bit_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, device_map={"": "cpu"}, dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16),
    )
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # non-zero B, so every LoRA matrix gets a gradient
    return get_peft_model(model, config)


def lora_gradients(model, batch):
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    # A gradient that never arrives (None) counts as zero: that is one way the trap shows.
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def eval_pass(model, batch):
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])


@pytest.fixture
def batch():
    torch.manual_seed(1)
    ids = torch.randint(3, tiny_config(49152).vocab_size, (2, 24))
    return dict(input_ids=ids, labels=ids.clone())


def max_relative_change(before, after):
    return max(float((after[n] - before[n]).norm() / before[n].norm()) for n in before)


def test_eval_pass_leaves_lora_gradients_unchanged(lora_4bit_model, batch):
    assert keep_4bit_weights_trainable(lora_4bit_model) == 2 * 7  # every linear layer of both blocks
    before = lora_gradients(lora_4bit_model, batch)
    eval_pass(lora_4bit_model, batch)
    after = lora_gradients(lora_4bit_model, batch)
    assert max_relative_change(before, after) < 1e-5


def test_without_the_fix_the_trap_is_real_on_this_cpu(lora_4bit_model, batch):
    from bitsandbytes.functional import has_avx512bf16 as cpu_has_avx512bf16

    if not cpu_has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never takes the packed path here")
    before = lora_gradients(lora_4bit_model, batch)
    eval_pass(lora_4bit_model, batch)
    after = lora_gradients(lora_4bit_model, batch)
    assert max_relative_change(before, after) > 1e-2, "the trap no longer reproduces; the fix may be obsolete"

"""The levers that make the train stage faster than `trl sft` keep its results the same.

- TRL's fused LM head scoring only the labelled positions on CPU (score_labelled_positions_only)
  gives the same loss and LoRA gradients as scoring every position.
- Its backward sums the hidden states' gradient in float32 with the head's weight upcast a slice
  at a time on CPU (head_grads_upcast_in_slices), as TRL sums it.
- `train.attn_implementation: auto` picks eager attention for short examples on CPU and sdpa for
  long ones; both give the same loss.
- Every stage's model runs its 4-bit layers through the training path (the CPU trap fix is on).
- Gradient checkpointing, every n-th layer, gives the same gradients as none.

Each holds for every model family tested, not only Llama: Qwen2 (biased q, k, v), Gemma 3
(scaled embeddings, q/k norms, sliding-window layers) and Gemma 3 with Gemma 2's final logit
soft-capping, which the fused head must apply before the log-softmax. None switches itself off
for these families: TRL's fused head reads the soft-capping and logit scale from the config,
every transformers model implements eager attention, and the 4-bit fix acts on each
bitsandbytes layer whatever model holds it (tests/test_models.py runs it on Qwen2 and Gemma 3).
"""

import pytest
import torch

from conftest import tiny_config, tiny_family_config

FAMILIES = ["llama", "qwen2", "gemma3", "gemma3-softcap"]


def family_model(family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        return AutoModelForCausalLM.from_config(tiny_config(49152))
    config = tiny_family_config(family.split("-")[0], 49152)
    if family.endswith("softcap"):
        config.final_logit_softcapping = 30.0
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(params=FAMILIES)
def tiny_lora_model(request):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)  # non-zero B: every LoRA matrix gets a gradient
    return family_model(request.param), config


@pytest.fixture
def batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 49152, (3, 40))
    labels = torch.full_like(ids, -100)
    labels[:, 30:34] = ids[:, 30:34]  # a prompt-masked batch: 4 answer tokens of 40
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def fused_loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, fused_lm_head=True).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_scoring_only_labelled_positions_keeps_loss_and_gradients(tiny_lora_model, batch, monkeypatch):
    import trl.trainer.utils as trl_utils
    from peft import get_peft_model

    from qlora.models import score_labelled_positions_only

    model, config = tiny_lora_model
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model = get_peft_model(model, config)
    cpu = torch.device("cpu")

    shipped = trl_utils._use_triton  # TRL's own, also when a test before this one built a trainer in-process
    while getattr(shipped, "scores_cpu_compact", False):
        shipped = shipped.__closure__[0].cell_contents
    monkeypatch.setattr(trl_utils, "_use_triton", shipped)  # undone after the test
    assert not trl_utils._use_triton(cpu)  # TRL as shipped scores every position on CPU
    every_loss, every_grads = fused_loss_and_grads(model, batch)

    assert score_labelled_positions_only()
    assert trl_utils._use_triton(cpu)
    assert score_labelled_positions_only()  # a second call does not wrap the wrapper
    assert trl_utils._use_triton.__closure__[0].cell_contents.__name__ == "_use_triton"
    labelled_loss, labelled_grads = fused_loss_and_grads(model, batch)

    torch.testing.assert_close(labelled_loss, every_loss, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and both are the model's own loss (soft-capping, logit scale and all)
        torch.testing.assert_close(model(**batch).loss, labelled_loss, rtol=1e-5, atol=1e-5)
    for name, grad in every_grads.items():
        assert grad.norm() > 0, name
        torch.testing.assert_close(labelled_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_head_grads_upcast_in_slices_sum_in_float32(tiny_lora_model, batch, monkeypatch):
    """The LM head's hidden-state gradient, upcast a slice of the vocabulary at a time on CPU, is
    TRL's float32 sum (not a bf16-rounded one), and the fused head's backward goes through it."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trl_utils
    from peft import get_peft_model

    from qlora.models import ADDMM_ROWS, head_grads_upcast_in_slices

    shipped = kernel._addmm_fp32
    while getattr(shipped, "in_slices", False):  # TRL's own, also when a trainer was built in-process
        shipped = shipped.__closure__[0].cell_contents
    monkeypatch.setattr(kernel, "_addmm_fp32", shipped)
    assert head_grads_upcast_in_slices() and head_grads_upcast_in_slices()  # a second call does not wrap again
    sliced = kernel._addmm_fp32
    assert sliced.in_slices and sliced.__closure__[0].cell_contents is shipped

    torch.manual_seed(0)
    a = torch.randn(16, 5 * ADDMM_ROWS + 7, dtype=torch.bfloat16)  # tokens x vocabulary, a ragged last slice
    b = torch.randn(a.shape[1], 64, dtype=torch.bfloat16)  # vocabulary x hidden
    exact = a.double() @ b.double()
    for fn in (shipped, sliced):
        acc = torch.ones(16, 64)  # accumulated into, not overwritten
        fn(acc, a, b)
        torch.testing.assert_close(acc.double(), exact + 1, rtol=1e-5, atol=1e-3)
    with pytest.raises(AssertionError):  # the tolerance tells a bf16-rounded product apart
        torch.testing.assert_close((a @ b).double() + 1, exact + 1, rtol=1e-5, atol=1e-3)

    calls = []
    monkeypatch.setattr(kernel, "_addmm_fp32", lambda acc, a, b: calls.append(a.shape) or sliced(acc, a, b))
    model, config = tiny_lora_model
    trl_utils.add_fused_lm_head(model, outputs=("log_probs",))
    fused_loss_and_grads(get_peft_model(model, config), batch)
    assert calls and all(shape[1] <= 32768 for shape in calls)  # TRL's vocabulary chunks, sliced inside


@pytest.mark.parametrize("module, name, patch", [
    ("trl.trainer.utils", "_use_triton", "score_labelled_positions_only"),
    ("trl.kernels.chunked_logprob", "_addmm_fp32", "head_grads_upcast_in_slices"),
])
def test_a_trl_upgrade_without_the_patched_internal_stops_training(module, name, patch, monkeypatch):
    """Both patches need a private TRL function: where an upgrade removed it, they raise naming it
    and TRL's version, rather than train on at the unpatched speed without a word."""
    import importlib

    import trl

    from qlora import models

    monkeypatch.delattr(importlib.import_module(module), name)
    with pytest.raises(RuntimeError, match=rf"trl {trl.__version__} has no {module}\.{name}"):
        getattr(models, patch)()


def test_auto_attention_is_eager_for_short_examples_on_cpu(monkeypatch):
    from types import SimpleNamespace

    import stages.train
    from stages.train import EAGER_UP_TO, attention

    monkeypatch.setattr(stages.train, "device", lambda: "cpu")  # on every machine, a GPU one too

    def pick(setting, longest, budget=0):
        t = SimpleNamespace(attn_implementation=setting, micro_batch_tokens=budget)
        return attention(t, {"input_ids": [[1] * 10, [1] * longest]})

    assert pick("auto", EAGER_UP_TO) == "eager"
    assert pick("auto", EAGER_UP_TO + 1) == "sdpa"
    assert pick("auto", 20, budget=512) == "sdpa"  # packed rows are as long as the budget
    assert pick("sdpa", 20) == "sdpa"
    assert pick("eager", 2000) == "eager"
    monkeypatch.setattr(stages.train, "device", lambda: "cuda")
    assert pick("auto", 20) == "sdpa"


def test_auto_token_budget_is_off_on_cpu_and_fills_a_gpu_keeping_the_global_batch(monkeypatch):
    """train.micro_batch_tokens auto: off on CPU; on a GPU, GPU_MICRO_BATCH_TOKENS per packed row when
    the global batch holds more tokens than that, with as many rows accumulated as hold it."""
    from types import SimpleNamespace

    import stages.train
    from stages.train import GPU_MICRO_BATCH_TOKENS as BUDGET, batching

    examples = {"input_ids": [[1] * 100, [1] * 300]}  # 200 tokens on average

    def batches(where, budget, batch_size, accumulation=1):
        monkeypatch.setattr(stages.train, "device", lambda: where)
        t = SimpleNamespace(micro_batch_tokens=budget, batch_size=batch_size, gradient_accumulation_steps=accumulation)
        return batching(t, examples)

    big = BUDGET // 200 * 4  # a global batch of about 4 budgets
    assert batches("cpu", "auto", big) == (big, 1, None)
    assert batches("cuda", "auto", 8) == (8, 1, None)  # 1,600 tokens: one padded batch as before
    assert batches("cuda", "auto", big // 2, 2) == (1, 4, BUDGET)  # 4 rows of the budget, the same examples per step
    assert batches("cuda", 0, big) == (big, 1, None)
    assert batches("cpu", 1000, 64) == (1, 13, 1000)  # 12,800 tokens per step in rows of 1,000
    assert batches("cpu", 1000, 2) == (1, 1, 1000)  # at least one row: here about 5 examples a step, not 2


def test_liger_and_compile_resolve_by_device(monkeypatch):
    from types import SimpleNamespace

    import stages.train
    from qlora.params import ParamsError
    from stages.train import compiling, liger, offloading

    monkeypatch.setattr(stages.train, "device", lambda: "cpu")
    with pytest.raises(ParamsError, match="train.activation_offloading true needs a CUDA GPU"):
        offloading(SimpleNamespace(activation_offloading=True))
    assert liger(SimpleNamespace(liger_kernel="auto")) is False
    assert compiling(SimpleNamespace(compile="auto")) is False
    assert compiling(SimpleNamespace(compile=True)) is True  # it compiles on CPU too, when asked
    with pytest.raises(ParamsError, match="train.liger_kernel true needs a CUDA GPU"):
        liger(SimpleNamespace(liger_kernel=True))
    monkeypatch.setattr(stages.train, "device", lambda: "cuda")
    assert compiling(SimpleNamespace(compile="auto")) is True  # torch 2.13 here: >= 2.8
    assert compiling(SimpleNamespace(compile=False)) is False


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_rows_keep_each_example_apart(family, impl):
    """Examples packed into one row as the train stage packs them (train.micro_batch_tokens: TRL's
    best-fit-decreasing packing, its padding-free collator) get the loss they get alone in a padded
    batch, token for token: attention does not cross an example's boundary (transformers reads the
    boundaries from the restarting position ids)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = family_model(family).eval()
    model.config.use_cache = False  # as load_model has it: with a cache, transformers looks for no packed rows
    model.set_attn_implementation(impl)
    torch.manual_seed(2)
    examples = [torch.randint(3, 49152, (n,)).tolist() for n in (12, 30, 7)]
    rows = [{"input_ids": ids, "labels": [-100] * (len(ids) - 3) + ids[-3:]} for ids in examples]

    def token_losses(batch):
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0),
                                                   reduction="none")
        return losses[labels != -100].sort().values  # packing reorders the examples

    packed_rows = pack_dataset(Dataset.from_list(rows), 64, "bfd")
    assert len(packed_rows) == 1 and sorted(packed_rows[0]["seq_lengths"]) == [7, 12, 30]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([packed_rows[0]])
    assert packed["input_ids"].shape == (1, 49) and "attention_mask" not in packed
    alone, together = token_losses(padded), token_losses(packed)
    assert alone.numel() == together.numel() == 3 * 3
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    crossing = {k: v for k, v in packed.items() if k in ("input_ids", "labels")}  # no position ids: one long text
    with pytest.raises(AssertionError):  # the check tells attention across examples apart
        torch.testing.assert_close(token_losses(crossing), alone, rtol=1e-4, atol=1e-4)


def test_a_lora_on_the_head_would_never_train_so_it_is_refused():
    """TRL's fused LM head multiplies by lm_head.weight itself, past peft's LoRA wrapper: a LoRA on
    lm_head gets no gradient (the params refuse it), while lm_head in modules_to_save trains. When
    TRL changes this, the first half fails and the refusal can go."""
    import trl.trainer.utils as trl_utils
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(3, 49152, (2, 20))
    grads = {}
    for kind in ("target_modules", "modules_to_save"):
        config = tiny_config(49152)
        config.tie_word_embeddings = False
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
        trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        lora = LoraConfig(r=4, init_lora_weights=False, **({"target_modules": ["q_proj", "lm_head"]} if kind ==
                          "target_modules" else {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}))
        model = get_peft_model(model, lora)
        model(input_ids=ids, labels=ids, fused_lm_head=True).loss.backward()
        grads[kind] = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n]
    assert grads["target_modules"] and all(g is None for g in grads["target_modules"])
    assert grads["modules_to_save"] and all(g is not None and g.norm() > 0 for g in grads["modules_to_save"])


def test_lm_head_in_target_modules_is_refused_with_the_key(tmp_path):
    import shutil

    from qlora.params import ParamsError, parse_params
    from conftest import ROOT, set_params

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path / "params.yaml", {"lora.target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(ParamsError, match="lora.target_modules must be layers other than lm_head.*modules_to_save"):
        parse_params(tmp_path / "params.yaml")


def test_auto_checkpointing_is_off_on_cpu_and_every_2nd_layer_there_when_on(monkeypatch):
    from types import SimpleNamespace

    import stages.train
    from stages.train import checkpointing, checkpointing_every

    def on(setting, where):
        monkeypatch.setattr(stages.train, "device", lambda: where)
        return checkpointing(SimpleNamespace(gradient_checkpointing=setting))

    def every(setting, where):
        monkeypatch.setattr(stages.train, "device", lambda: where)
        return checkpointing_every(SimpleNamespace(gradient_checkpointing_every=setting))

    assert on("auto", "cpu") is False and on("auto", "cuda") is True
    assert on(True, "cpu") is True and on(False, "cuda") is False
    assert every("auto", "cpu") == 2
    assert every("auto", "cuda") == 1
    assert every(1, "cpu") == 1 and every(3, "cuda") == 3


def test_eager_and_sdpa_attention_give_the_same_loss(tiny_lora_model, batch):
    model, _ = tiny_lora_model
    batch = dict(batch, attention_mask=batch["attention_mask"].clone())
    batch["attention_mask"][0, 35:] = 0  # one padded row
    losses = {}
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            losses[impl] = model(**batch).loss
    torch.testing.assert_close(losses["eager"], losses["sdpa"], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_every_other_layer_keeps_gradients(tiny_lora_model, batch):
    from peft import get_peft_model

    model, config = tiny_lora_model
    model = get_peft_model(model, config)
    model.train()

    def grads():
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.enable_input_require_grads()
    model.activation_checkpointing_enable(every_n_layers=2)
    checkpointed = grads()
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert [m.gradient_checkpointing for m in layers] == [True, False]  # the first of every 2 recomputes
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad)


def test_a_token_budget_trains_packed_rows_through_the_stage(tiny_project):
    """train.micro_batch_tokens set: the stage packs whole examples into rows of at most the budget,
    accumulates the rows that hold the global batch, trains, and records what it resolved."""
    import json

    from conftest import run, set_params

    tokenized = json.loads((tiny_project / "metrics/tokenize.json").read_text())
    budget = 4 * tokenized["max_tokens"]
    set_params(tiny_project / "params.yaml", {"train.micro_batch_tokens": budget, "train.batch_size": 8,
                                              "train.gradient_accumulation_steps": 2})
    out = run(["python", "-m", "stages.train"], tiny_project)
    train = json.loads((tiny_project / "metrics/train.json").read_text())
    assert train["micro_batch_tokens"] == budget and train["attention"] == "sdpa"
    assert "packed rows" in out.stderr + out.stdout
    import pandas as pd

    mean = pd.read_parquet(tiny_project / "data/tokenized/train.parquet")["input_ids"].map(len).mean()
    assert train["gradient_accumulation_steps"] == max(1, round(16 * mean / budget))
    assert train["steps"] == 3 and train["final_loss"] > 0


@pytest.mark.cpu
def test_gpu_only_levers_stop_the_stage_before_any_training_on_cpu(tiny_project):
    from conftest import run, set_params

    before = (tiny_project / "metrics/train.json").read_text()
    for key, message in (("train.liger_kernel", "train.liger_kernel true needs a CUDA GPU"),
                         ("train.activation_offloading", "train.activation_offloading true needs a CUDA GPU")):
        set_params(tiny_project / "params.yaml", {key: True})
        result = run(["python", "-m", "stages.train"], tiny_project, check=False)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
        assert "trainable parameters" not in result.stderr + result.stdout  # stopped before the model was built
        set_params(tiny_project / "params.yaml", {key: False})
    assert (tiny_project / "metrics/train.json").read_text() == before  # the last good results kept


def test_every_stage_loads_4bit_layers_on_the_training_path(tiny_project, monkeypatch):
    """On a CPU with AVX512-BF16, an eval pass repacks bitsandbytes' 4-bit weights for inference, after
    which no gradient flows through them: a model loaded as every stage loads it keeps them."""
    from transformers import AutoModelForCausalLM

    from conftest import as_on_a_trap_cpu, eval_pass_repacks
    from qlora.models import load_model

    as_on_a_trap_cpu(monkeypatch)
    plain = AutoModelForCausalLM.from_pretrained(tiny_project / "models/quantized")
    assert eval_pass_repacks(plain), "the trap this guards against, in this bitsandbytes"
    assert eval_pass_repacks(load_model(tiny_project / "models/quantized", "auto")) == []


def test_fast_lora_dropout_is_dropout():
    """The LoRA dropout whose masks are drawn faster on CPU keeps each input with probability
    1 - p, scales it by 1 / (1 - p), masks the gradient the same way, is fixed by the seed, and
    is the identity in eval mode; every LoRA dropout of a peft model is swapped for it."""
    from peft import LoraConfig, get_peft_model

    from qlora.models import FastDropout, fast_lora_dropout

    p = 0.2
    drop = FastDropout(p)
    for dtype in (torch.bfloat16, torch.float32):  # bf16 masks are written as bit patterns, others selected
        drop.train()
        x = torch.randn(64, 100, 64, dtype=dtype, requires_grad=True)
        torch.manual_seed(3)
        y = drop(x)
        kept = y != 0
        share = kept.float().mean().item()
        assert abs(share - (1 - p)) < 0.01, (dtype, share)  # 409,600 draws: the standard error is 0.0006
        assert torch.equal(y[kept], (x * torch.tensor(1 / (1 - p), dtype=dtype))[kept])
        y.float().sum().backward()
        assert torch.equal(x.grad, torch.where(kept, torch.tensor(1 / (1 - p), dtype=dtype), 0))
        torch.manual_seed(3)
        assert torch.equal(drop(x), y), "the same seed, the same mask"
        assert not torch.equal(drop(x), y), "the next call draws a new mask"
        assert drop.eval()(x) is x and FastDropout(0.0).train()(x) is x
    for p in (0.05, 0.5):  # the cut at round(p * 2^16) keeps 1 - p of the inputs, not a rounded share
        torch.manual_seed(0)
        share = (FastDropout(p).train()(torch.ones(4_000_000, dtype=torch.bfloat16)) != 0).float().mean().item()
        assert abs(share - (1 - p)) < 0.001, (p, share)  # the standard error is at most 0.00025

    # Under gradient checkpointing the recompute gets the first pass's mask back, unpacked, not
    # drawn again: the same gradient as without checkpointing, from one draw.
    from unittest import mock

    import numpy as np

    linear = torch.nn.Linear(64, 64, dtype=torch.bfloat16)
    x0 = torch.randn(8, 30, 64, dtype=torch.bfloat16)
    draws = []
    sfc64 = np.random.SFC64

    def counted(seed):
        draws.append(seed)
        return sfc64(seed)

    def input_grad(checkpointed):
        drop, x = FastDropout(0.1).train(), x0.clone().requires_grad_()
        torch.manual_seed(5)
        f = lambda t: linear(drop(t))  # noqa: E731
        with mock.patch.object(np.random, "SFC64", counted):
            y = torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False) if checkpointed else f(x)
            y.float().square().sum().backward()
        return x.grad

    plain = input_grad(False)
    assert len(draws) == 1
    checkpointed = input_grad(True)
    assert len(draws) == 2, "the recompute unpacked the kept mask instead of drawing it again"
    assert torch.equal(checkpointed, plain)

    model = get_peft_model(family_model("llama"), LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert fast_lora_dropout(model) == 2 * model.config.num_hidden_layers
    assert not any(type(m) is torch.nn.Dropout for m in model.modules() if m is not model)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_that_keep_less_give_the_same_loss_and_gradients_bit_for_bit(family, batch, monkeypatch):
    """RMSNorm and the SwiGLU MLP swapped for ones keeping bf16 inputs, eager attention recomputing
    its softmax in the backward, and LoRA's dropout folded into its A matrix (qlora/lean.py) give the
    same loss and LoRA gradients: to the last bit in bf16, as trained; to float32 rounding in
    float32. And the forward keeps fewer bytes for the backward. Gemma 3 (1 + weight norms, a GELU
    MLP) keeps its own norms and MLP."""
    from peft import LoraConfig, get_peft_model

    import qlora.lean
    from qlora.lean import DroppedLinear, keep_less_for_backward
    from qlora.models import fast_lora_dropout

    folded = []
    apply = qlora.lean._DroppedLinear.apply
    monkeypatch.setattr(qlora.lean._DroppedLinear, "apply", lambda *a: folded.append(1) or apply(*a))

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    for dtype in (torch.bfloat16, torch.float32):
        # the adapter in the model's dtype, as the train stage has it (SFTTrainer, no kbit upcast)
        model = get_peft_model(family_model(family).to(dtype), config, autocast_adapter_dtype=False)
        model.set_attn_implementation("eager")
        assert fast_lora_dropout(model) == 2 * 4
        model.train()

        def loss_and_grads():
            model.zero_grad()
            torch.manual_seed(7)  # the same dropout masks
            kept = {}

            def pack(t):
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = model(**batch).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            return loss.detach(), grads, sum(kept.values())

        loss, grads, kept = loss_and_grads()
        swapped = keep_less_for_backward(model)
        # per layer: 4 LoRA dropouts folded, 2 norms, the MLP, the attention; and the final norm
        assert swapped == 2 * 4 + (2 if family.startswith("gemma3") else 2 * 4 + 1)
        lean_loss, lean_grads, lean_kept = loss_and_grads()
        assert len(folded) == 2 * 4  # each LoRA A of the forward took the folded path
        folded.clear()
        assert lean_kept < kept - 2 * 3 * 4 * 40 * 40 * 4  # at least each layer's float32 softmax, 3 x 4 heads x 40^2
        assert sum(isinstance(m, DroppedLinear) for m in model.modules()) == 2 * 4
        assert all(k.endswith("lora_A.default.weight") or "lora_A" not in k for k in model.state_dict())
        assert torch.equal(lean_loss, loss)
        assert grads.keys() == lean_grads.keys() and len(grads) == 2 * 4 * 2
        for name, grad in grads.items():
            assert grad.norm() > 0, name
            if dtype == torch.bfloat16:
                assert torch.equal(lean_grads[name], grad), name
            else:  # float32 norms: autograd adds the residual's gradient in another order
                torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-6)

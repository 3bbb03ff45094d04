"""Loading the base and quantized models, on CUDA when present and on CPU otherwise."""

import torch


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def quantization_config(q):
    """The BitsAndBytesConfig for params `quantize`; None for 16 bit (plain LoRA)."""
    from transformers import BitsAndBytesConfig

    from qlora.precision import storage_dtype

    # `auto` resolves where the model is loaded (load_model); what the quantize stage stores is the same
    # on every machine.
    compute_dtype = getattr(torch, storage_dtype(q.compute_dtype))
    if q.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            # the dtype the packed 4-bit codes are stored as: uint8, or the compute dtype for FSDP,
            # which can only shard a model whose parameters share one float dtype
            bnb_4bit_quant_storage=getattr(torch, q.quant_storage),
        )
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(path, compute_dtype, bnb_cpu_inference=False):
    """A model saved by the quantize stage (the bitsandbytes config travels in its config.json), computing
    in `compute_dtype` (params `quantize.compute_dtype`) with `auto` resolved here, on the machine that runs
    it: qlora/precision.py. One console line says which dtype and why; `model.compute_precision` keeps it
    for the stage's records.

    Every stage runs 4-bit layers through the path training uses (dequantize, then a matmul in
    the compute dtype), for training, mid-training evaluation, evaluation and generation alike:
    see `keep_4bit_weights_trainable`. On CPU that path is also faster than bitsandbytes' packed
    inference path and close to a bf16 model without quantization (benchmarks/bench_eval.py
    measures it into benchmarks/results/eval-4bit-vs-bf16.json, `models`; benchmarks/README.md
    renders the figures); `bnb_cpu_inference=True` keeps the
    packed path, for that benchmark only.
    """
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from qlora.outputs import log
    from qlora.precision import compute_in, resolve

    precision = resolve(compute_dtype, device())
    quantized = "quantization_config" in json.loads((Path(path) / "config.json").read_text())
    # Unquantized (quantize.bits 16), every weight is a matmul's: loaded in the compute dtype. Quantized,
    # the unquantized weights keep the dtype they were stored in (compute_in).
    model = AutoModelForCausalLM.from_pretrained(path, device_map={"": device()}, use_safetensors=True,
                                                 **({} if quantized else {"dtype": precision.torch_dtype}))
    model.config.use_cache = False
    if quantized:
        compute_in(model, precision)
    model.compute_precision = precision
    measured = f"; {precision.measured}" if precision.measured else ""
    log(f"computing in {precision.dtype}: {precision.reason}{measured}")
    if not bnb_cpu_inference:
        keep_4bit_weights_trainable(model)
    return model


def keep_4bit_weights_trainable(model):
    """Turn off bitsandbytes' packed CPU inference path on every 4-bit layer; returns how many.

    The trap: on CPUs with AVX512-BF16, a `Linear4bit` forward in eval mode without
    grad repacks its weight in place into a CPU inference layout and never packs it
    back (bitsandbytes/nn/modules.py, Linear4bit.forward). From then on matmul_4bit
    takes `gemv_4bit`, a custom op with no autograd kernel, so no gradient flows back
    through that layer: LoRA matrices below it get wrong or no gradients, silently,
    after any mid-training evaluation or generate(). With the flag off, evaluation
    takes the same dequantize-and-matmul path as training.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            # Unpacking is lossy (bitsandbytes' inverse keeps bf16 scales): only a reload is clean.
            raise RuntimeError("a 4-bit layer was already repacked by an eval pass; reload the model first")
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def is_quantized(model):
    return getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)


def module_names(model):
    """Short names of the linear layers LoRA can target (q_proj, down_proj, ...)."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__}


def score_labelled_positions_only():
    """Make TRL's fused LM head project only the positions that have a label, on CPU too.

    SFTTrainer replaces the logits with a chunked log-prob head (trl/trainer/utils.py,
    `add_fused_lm_head`). It scores only the positions whose label is not -100 when it
    runs on Triton devices, and every position elsewhere, so that tile shapes stay fixed
    for compiling backends such as Neuron. On CPU nothing is compiled, and with the
    prompt masked out of the loss, most positions carry no label: only the answer and its
    end of turn do (their share per split: metrics/tokenize.json, `train_labelled_share`).
    Projecting the others through the 49,152-word head, forward and backward, is work
    whose result is discarded (where a step's time goes now: benchmarks/results/profile-step.json,
    `operators`). The loss and its gradient are the same: the skipped positions are
    multiplied by zero either way. Raises if TRL no longer has the hook, so that an
    upgrade which renames it stops training instead of silently scoring every position.
    """
    import trl
    import trl.trainer.utils as trl_utils

    use_triton = getattr(trl_utils, "_use_triton", None)
    if use_triton is None:
        raise RuntimeError(f"trl {trl.__version__} has no trl.trainer.utils._use_triton, the private hook "
                           "score_labelled_positions_only patches: find what replaced it and patch that")
    if not getattr(use_triton, "scores_cpu_compact", False):
        def compact(device):
            return device.type == "cpu" or use_triton(device)

        compact.scores_cpu_compact = True
        trl_utils._use_triton = compact
    return True


ADDMM_ROWS = 2048  # rows of the vocabulary upcast at a time: a slice that stays in the CPU's cache


def head_grads_upcast_in_slices():
    """Make TRL's LM-head backward upcast the head's weight to float32 a slice at a time on CPU.

    The gradient of the hidden states is `tile @ weight` over the 49,152-word vocabulary, summed
    in float32 (trl/kernels/chunked_logprob.py, `_addmm_fp32`: rounding each vocabulary chunk's
    product to bf16 biases training). CUDA has a bf16 matmul with a float32 output; on CPU TRL
    upcasts both operands, a copy of 32,768 x 576 weights per chunk that costs more than the matmul.
    Here the same float32 sums run over slices of ADDMM_ROWS vocabulary rows, each upcast while
    in cache: faster, the same sums up to float32 rounding (`tests/test_speed_levers.py`).
    Raises if TRL no longer has the function, so that an upgrade which renames it stops training
    instead of silently running the slow upcast.
    """
    import trl
    import trl.kernels.chunked_logprob as kernel

    upcast = getattr(kernel, "_addmm_fp32", None)
    if upcast is None:
        raise RuntimeError(f"trl {trl.__version__} has no trl.kernels.chunked_logprob._addmm_fp32, the private "
                           "function head_grads_upcast_in_slices patches: find what replaced it and patch that")
    if getattr(upcast, "in_slices", False):
        return True

    def in_slices(acc, a, b):
        if acc.device.type != "cpu" or a.shape[1] <= ADDMM_ROWS:
            return upcast(acc, a, b)
        for start in range(0, a.shape[1], ADDMM_ROWS):
            acc.addmm_(a[:, start:start + ADDMM_ROWS].float(), b[start:start + ADDMM_ROWS].float())

    in_slices.in_slices = True
    kernel._addmm_fp32 = in_slices
    return True


class FastDropout(torch.nn.Module):
    """`torch.nn.Dropout` with its keep-mask drawn cheaply on the CPU: the same arithmetic (each
    input kept with probability 1 - p and scaled by 1 / (1 - p), the gradient masked the same
    way), the mask drawn by numpy's SFC64 seeded from torch's generator, so a seed still fixes
    every mask. torch draws a CPU dropout mask one Bernoulli sample at a time; with LoRA on
    the attention projections of 30 layers that is 120 masks per step (what the dropout costs
    now: benchmarks/results/levers.json, `variants["no LoRA dropout"].speed_vs_default`, a run
    with `lora.dropout: 0` against the default). On other devices: torch's own dropout.

    Gradient checkpointing runs each layer's forward twice with torch's generator restored in
    between, so the second pass draws the seed of the first: the module keeps its last keep-mask
    packed to one bit per input and unpacks it for that seed instead of drawing it again."""

    def __init__(self, p):
        super().__init__()
        self.p = p
        self._last = None  # (seed, shape, packed keep-mask) of the last draw

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, True)
        return _MaskMul.apply(x, self.mask(self.draw(x), x))

    def draw(self, x):
        """The keep-mask for `x`, packed one bit per input: drawn, or the last one again for the same seed."""
        import numpy as np

        seed = int(torch.randint(2**62, ()))  # from torch's generator: transformers' set_seed fixes it
        if self._last is None or self._last[:2] != (seed, x.shape):
            # 16 random bits per input (SFC64's raw 64-bit words, four inputs each: faster than any
            # bounded draw), kept when at or above round(p * 2^16): a keep rate within 2^-17 of 1 - p.
            n = x.numel()
            bits = np.random.SFC64(seed).random_raw(-(-n // 4)).view(np.uint16)[:n]
            self._last = (seed, x.shape, np.packbits(bits >= np.uint16(round(self.p * (1 << 16)))))
        return self._last[2]

    def mask(self, packed, x):
        """The multiplier of `x` for the keep-mask `packed`: 1 / (1 - p) where kept, 0 elsewhere, in x's dtype."""
        import numpy as np

        keep = np.unpackbits(packed, count=x.numel()).view(bool)
        scale = torch.tensor(1 / (1 - self.p), dtype=x.dtype)
        if x.dtype == torch.bfloat16:
            # written directly as bfloat16 bit patterns (the scale or zero): no select pass
            pattern = np.uint16(scale.view(torch.int16).item() & 0xFFFF)
            mask = torch.from_numpy(np.multiply(keep, pattern, dtype=np.uint16)).view(torch.bfloat16)
        else:
            mask = torch.where(torch.from_numpy(keep), scale, torch.tensor(0, dtype=x.dtype))
        return mask.view(x.shape)

    def extra_repr(self):
        return f"p={self.p}"


class _MaskMul(torch.autograd.Function):
    """x * mask, its gradient grad * mask: one multiplication each way (autograd's own graph for
    dropout takes two, and keeps more)."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def fast_lora_dropout(model):
    """Swap every LoRA dropout of a peft model for FastDropout; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                    dropouts[name] = FastDropout(dropout.p)
                    swapped += 1
    return swapped

"""Layers that keep less for the backward pass, with the same arithmetic.

What a training step holds at its peak is mostly what each layer not checkpointed keeps for its
backward pass (on CPU, with `train.gradient_checkpointing: auto`, every layer). Two of the model's own
layers keep more than their backward needs, as autograd records them op by op:
- RMSNorm keeps its input upcast to float32: a copy per norm with twice the bytes of the
  bfloat16 input it came from;
- the SwiGLU MLP keeps the gate, the up projection and the SiLU of the gate (each as wide as the
  intermediate size), though the gate gives the SiLU again for one elementwise op.
Here each is one autograd function that keeps its bfloat16 inputs and replays, in its backward,
the same torch ops in the same order as autograd's own backward: the gradients are equal bit for
bit in bfloat16 (tests/test_speed_levers.py). A module is swapped only when its forward is the
Llama one word for word (Llama, Qwen2, Qwen3, Mistral, SmolLM3, ...) and, for the MLP, its
activation is SiLU; any other family keeps its own layers.

Eager attention keeps its softmax twice, in float32 and cast to bf16 (a copy per layer growing
with the square of the length). In layers not checkpointed, the family's own eager attention runs
under torch's checkpoint: it keeps q, k and v and recomputes the two small matmuls and the softmax
in the backward, the same ops, so the same bits.

LoRA's dropout, peft's lora_B(lora_A(dropout(x))), keeps the dropout's mask and the dropped copy
of x for each adapted projection, though q, k and v share one x: DroppedLinear folds the dropout
into A and keeps x and the mask packed to one bit per input (the same masks, the same bits).

All of it on CPU only: on a GPU it is untested.
"""

import inspect
import sys
import types
import weakref

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from qlora.models import FastDropout


class _RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)) in float32, cast back: LlamaRMSNorm's forward; keeps x, not float32 x."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, weight, r = ctx.saved_tensors
        xf = x.float()
        gh = (gy * weight).float()  # back through weight * h.to(dtype)
        grad_r = (gh * xf).sum(-1, keepdim=True)  # h = xf * r, both ways
        grad_var = -0.5 * grad_r * r.pow(3)  # r = rsqrt(var + eps)
        dx = gh * r + (grad_var.expand(x.shape) / x.shape[-1]) * (2 * xf)  # var = mean(xf ** 2)
        gw = None
        if ctx.needs_input_grad[1]:  # a frozen norm (LoRA) needs none
            gw = (gy * (xf * r).to(x.dtype)).sum(tuple(range(x.dim() - 1))).to(weight.dtype)
        return dx.to(x.dtype), gw, None


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up; keeps gate and up, and recomputes silu(gate) in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, gy):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(gy * up, gate), gy * F.silu(gate)


def _rms_norm(self, x):
    return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


def _swiglu_mlp(self, x):
    return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


class _DroppedLinear(torch.autograd.Function):
    """(x * mask) @ weight.T, LoRA's A after its dropout; keeps x and the mask packed to one bit per
    input, and recomputes x * mask in the backward, instead of keeping the mask and x * mask."""

    @staticmethod
    def forward(ctx, x, weight, dropout, packed):
        ctx.save_for_backward(x, weight)
        ctx.dropout, ctx.packed = dropout, packed
        dropped = x * dropout.mask(packed, x)
        return dropped.view(-1, x.shape[-1]).mm(weight.t()).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        mask = ctx.dropout.mask(ctx.packed, x)
        gy = gy.reshape(-1, gy.shape[-1])
        grad_x = gy.mm(weight).view(x.shape) * mask if ctx.needs_input_grad[0] else None
        grad_w = gy.t().mm((x * mask).view(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None


class DroppedLinear(torch.nn.Linear):
    """LoRA's A matrix with its dropout folded in (peft computes lora_B(lora_A(dropout(x)))).

    A layer's q, k and v projections share their input, and each LoRA A kept its own dropped copy
    of it plus its mask: here they keep the one input and a 1-bit mask each (a sixteenth of the
    input's bfloat16 bytes), against a dropped copy each. The same FastDropout draws the same masks.
    It holds the same weight Parameter, so the adapter's keys and the optimizer see no change."""

    def __init__(self, linear, dropout):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.dropout = dropout

    def forward(self, x):
        weight = self.weight
        if torch.is_autocast_enabled(x.device.type):
            weight = weight.to(torch.get_autocast_dtype(x.device.type))  # the cast autocast makes in F.linear
        if (not self.training or self.dropout.p == 0 or x.device.type != "cpu" or self.bias is not None
                or x.dtype != weight.dtype):
            return super().forward(self.dropout(x))
        with torch.autocast(x.device.type, enabled=False):
            return _DroppedLinear.apply(x, weight, self.dropout, self.dropout.draw(x))


def fold_lora_dropout(model):
    """Fold each FastDropout of a plain LoRA adapter into its A matrix (DroppedLinear); returns how many.
    Adapters with a variant (DoRA, ...) read the dropout apart and keep it."""
    folded = 0
    for module in model.modules():
        dropouts, a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, torch.nn.ModuleDict) or not isinstance(a, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if (isinstance(dropout, FastDropout) and name not in getattr(module, "lora_variant", {})
                    and type(a[name]) is torch.nn.Linear):
                a[name] = DroppedLinear(a[name], dropout)
                dropouts[name] = torch.nn.Identity()
                folded += 1
    return folded


_LAYER_OF = weakref.WeakKeyDictionary()  # attention module -> weakref to the decoder layer holding it


def _recomputing(eager):
    """The family's eager attention, its core recomputed in the backward of layers not checkpointed."""

    def attention(module, *args, **kwargs):
        layer = _LAYER_OF.get(module)
        layer = layer() if layer is not None else None
        if (layer is not None and module.training and torch.is_grad_enabled()
                and not getattr(layer, "gradient_checkpointing", False)):  # a checkpointed layer recomputes it all
            return torch.utils.checkpoint.checkpoint(eager, module, *args, use_reentrant=False, **kwargs)
        return eager(module, *args, **kwargs)

    attention.recomputes = eager
    return attention


def _recompute_attention(layer):
    """Route `layer.self_attn` through its family's eager attention wrapped by `_recomputing`; False where
    the family has no module-level eager_attention_forward (then nothing changes)."""
    attn = getattr(layer, "self_attn", None)
    family = sys.modules.get(type(attn).__module__)
    eager = getattr(family, "eager_attention_forward", None)
    if attn is None or eager is None:
        return False
    if not hasattr(eager, "recomputes"):
        family.eager_attention_forward = _recomputing(eager)
    _LAYER_OF[attn] = weakref.ref(layer)
    return True


def keep_less_for_backward(model):
    """On CPU: fold LoRA dropouts into their A matrices, swap the forward of each Llama-style RMSNorm and
    SwiGLU MLP, and recompute eager attention's softmax in the backward; returns how many modules changed."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    if next(model.parameters()).device.type != "cpu":
        return 0
    swapped = fold_lora_dropout(model)
    norm, mlp = inspect.getsource(LlamaRMSNorm.forward), inspect.getsource(LlamaMLP.forward)
    sources = {}
    for module in model.modules():
        kind = type(module)
        if kind not in sources:
            try:
                sources[kind] = inspect.getsource(kind.forward)
            except (OSError, TypeError):
                sources[kind] = None
        source = sources[kind]
        if kind.__name__.endswith("DecoderLayer") and _recompute_attention(module):
            swapped += 1
        if source == norm and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm, module)
            swapped += 1
        elif source == mlp and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU)):
            module.forward = types.MethodType(_swiglu_mlp, module)
            swapped += 1
    return swapped

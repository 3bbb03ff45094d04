"""quantize.compute_dtype: auto resolved per device where the model is loaded, the model computing in it,
and the MFU peak of the dtype and kernels that ran.

Devices this machine is not are patched: a CUDA GPU with and without bf16, a CPU with and without native
bf16 (the timed probe's answer). The AVX2 cap is real: a subprocess with the kernels capped resolves float32
whatever this CPU's flags say.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import AVX2_CAP, ROOT
from qlora import cost, precision
from qlora.models import load_model, quantization_config

@pytest.mark.parametrize("ratio, expected", [(0.4, "bfloat16"), (1.3, "bfloat16"), (27.0, "float32")])
def test_auto_on_a_cpu_follows_what_its_bf16_matmul_costs(monkeypatch, ratio, expected):
    monkeypatch.setattr(precision, "cpu_bf16_over_float32", lambda: ratio)
    resolved = precision.resolve("auto", "cpu")
    assert resolved.dtype == expected and resolved.reason.startswith("auto:") and f"{ratio:.2f}x" in resolved.measured
    assert resolved.measured not in str(resolved.record()), "the records are the same in every run"


@pytest.mark.parametrize("bf16, expected", [(True, "bfloat16"), (False, "float16")])
def test_auto_on_a_gpu_is_bf16_where_it_has_it_else_float16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4" if not bf16 else "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    resolved = precision.resolve("auto", "cuda")
    assert resolved.dtype == expected
    assert ("7.5" in resolved.reason) != bf16


def test_an_explicit_dtype_is_kept_on_any_device(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_over_float32", lambda: 40.0)
    assert precision.resolve("bfloat16", "cpu").dtype == "bfloat16"
    assert precision.resolve("float16", "cuda").dtype == "float16"


def resolved_in_a_process(env):
    code = ("from qlora.precision import resolve, cpu_bf16_over_float32 as r; "
            "print(resolve('auto', 'cpu').dtype, r())")
    uncapped = {k: v for k, v in os.environ.items() if k not in precision.ISA_VARIABLES}  # the suite may run capped
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**uncapped, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], float(out[1])


def test_under_the_avx2_cap_auto_resolves_float32_whatever_the_cpu_flags_say():
    """The probe times the kernels torch runs, not the flags the CPU reports: capped at AVX2, a CPU with
    AVX512-BF16 or AMX runs bf16 on the slow path, and auto must see it."""
    capped, capped_ratio = resolved_in_a_process(AVX2_CAP)
    assert capped == "float32" and capped_ratio > 2 * precision.NATIVE_UP_TO, capped_ratio
    flags = open("/proc/cpuinfo").read()
    if "avx512_bf16" in flags or "amx_bf16" in flags:  # and on such a CPU, uncapped, bf16
        native, ratio = resolved_in_a_process({})
        assert native == "bfloat16" and ratio < precision.NATIVE_UP_TO, ratio


@pytest.fixture(scope="module")
def quantized_auto(tiny_model_dir, tmp_path_factory):
    """The tiny model as the quantize stage stores it with compute_dtype auto: 4-bit NF4, the rest in bf16."""
    from transformers import AutoModelForCausalLM

    q = SimpleNamespace(bits=4, quant_type="nf4", double_quant=True, compute_dtype="auto", quant_storage="uint8")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization_config(q),
                                                 dtype=torch.bfloat16, device_map={"": "cpu"})
    out = tmp_path_factory.mktemp("quantized-auto")
    model.save_pretrained(out)
    return out


def dtypes_seen(model, ids):
    """The dtype of the input each matmul of `model` received in a forward pass (4-bit layers, the head)
    and of the logits; and the dtype of the embedding weights."""
    import bitsandbytes as bnb

    seen = set()
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype)) for m in model.modules()
             if isinstance(m, bnb.nn.Linear4bit) or m is model.get_output_embeddings()]
    try:
        logits = model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    return seen, logits.dtype, model.get_input_embeddings().weight.dtype


@pytest.mark.parametrize("resolved", ["float32", "bfloat16"])
def test_the_model_computes_in_the_resolved_dtype_and_keeps_its_storage(monkeypatch, quantized_auto, resolved):
    monkeypatch.setattr(precision, "cpu_bf16_over_float32", lambda: 0.5 if resolved == "bfloat16" else 30.0)
    model = load_model(quantized_auto, "auto")
    assert model.compute_precision.dtype == resolved
    matmul_inputs, logits, embedding = dtypes_seen(model, torch.tensor([[1, 5, 9, 13]]))
    assert matmul_inputs == {getattr(torch, resolved)}, matmul_inputs
    assert logits == getattr(torch, resolved) or (resolved == "bfloat16" and logits == torch.float32)
    assert embedding == torch.bfloat16, "the unquantized weights stay in their bf16 storage"
    # A 4-bit layer's product against float64 math on its weight dequantized to float32: float32 compute
    # agrees to float32 rounding, bf16 compute is off by bf16 rounding (8 bits of mantissa)
    import copy

    import bitsandbytes as bnb

    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    state = copy.copy(layer.weight.quant_state)
    state.dtype = torch.float32
    weight = bnb.functional.dequantize_4bit(layer.weight.data, state)
    x = torch.randn(16, layer.in_features)
    with torch.no_grad():
        got = layer(x.to(getattr(torch, resolved))).double()
    expected = torch.nn.functional.linear(x.double(), weight.double())
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error < 1e-5 if resolved == "float32" else error > 1e-4, error


def test_float32_compute_on_bf16_storage_is_float32_compute_on_float32_weights(monkeypatch, quantized_auto):
    """Keeping the unquantized weights in bf16 loses nothing: the same logits as upcasting them (a bf16
    value is exact in float32); what differs from bf16 compute is the compute."""
    monkeypatch.setattr(precision, "cpu_bf16_over_float32", lambda: 30.0)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    kept = load_model(quantized_auto, "auto")
    upcast = load_model(quantized_auto, "auto")
    for param in upcast.parameters():
        if param.dtype == torch.bfloat16:
            param.data = param.data.float()
    with torch.no_grad():
        a, b = kept(input_ids=ids).logits, upcast(input_ids=ids).logits
        bf16 = load_model(quantized_auto, "bfloat16")(input_ids=ids).logits.float()
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert (a - bf16).abs().max() > 1e-3, "bf16 compute rounds where float32 does not"


def test_float16_between_16_bit_dtypes_casts_the_unquantized_weights(quantized_auto):
    """A bf16-stored model on a GPU without bf16: its unquantized weights become float16 (autocast then runs
    every matmul in float16); on CPU here, with the precision given."""
    model = load_model(quantized_auto, "bfloat16")
    precision.compute_in(model, precision.Precision("float16", "test"))
    assert model.get_input_embeddings().weight.dtype == torch.float16
    assert {m.compute_dtype for m in model.modules() if hasattr(m, "compute_type_is_set")} == {torch.float16}


def test_the_eval_trap_stays_handled_in_float32(monkeypatch, quantized_auto):
    from conftest import as_on_a_trap_cpu, eval_pass_repacks

    as_on_a_trap_cpu(monkeypatch)
    monkeypatch.setattr(precision, "cpu_bf16_over_float32", lambda: 30.0)
    assert eval_pass_repacks(load_model(quantized_auto, "auto")) == []


@pytest.fixture
def peaks(monkeypatch, tmp_path):
    """cost's peak cache in a temporary folder, its measurements scripted: FLOP/s per core, in order."""
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path))
    for variable in precision.ISA_VARIABLES:  # the suite may run with the kernels capped
        monkeypatch.delenv(variable, raising=False)
    measured = []

    def measure(dtype="bfloat16", seconds=2.0):
        measured.append(dtype)
        return dict(per_core=script[dtype].pop(0), device=None, threads=2)

    script = {}
    monkeypatch.setattr(cost, "measure_peak", measure)
    return SimpleNamespace(script=script, measured=measured, file=tmp_path / "matmul-peak.json")


def test_the_peak_is_kept_per_dtype_and_kernel_cap(peaks, monkeypatch):
    peaks.script.update(bfloat16=[100e9], float32=[50e9, 40e9])
    assert cost.peak(2, "bfloat16") == 200e9 and cost.peak(2, "float32") == 100e9
    assert cost.peak(2, "float32") == 100e9 and peaks.measured == ["bfloat16", "float32"], "cached"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cost.peak(2, "float32") == 80e9, "capped kernels are another machine"
    assert len(json.loads(peaks.file.read_text())) == 3


def test_a_low_cached_peak_is_measured_again_and_an_mfu_is_never_above_one(peaks):
    config = SimpleNamespace(num_hidden_layers=1, hidden_size=8, num_attention_heads=1, intermediate_size=8,
                             vocab_size=8)  # 4N + 12·L·d·T + 6·P = 4 * 320 + 96 * 10 + 0 = 2240 FLOPs per token
    flops = cost.flops_per_token(config, 10, 0)
    peaks.script["float32"] = [1e6, 4e6, 4e6]  # measured busy, then alone twice
    assert cost.peak(1, "float32") == 1e6
    assert cost.mfu(config, 10, 0, 2e6 / flops, 1, "float32") == 0.5, "beat the cached peak: measured again"
    assert cost.peak(1, "float32") == 4e6, "the higher peak replaced the low one"
    assert cost.mfu(config, 10, 0, 8e6 / flops, 1, "float32") is None, "still above 1 after measuring again"

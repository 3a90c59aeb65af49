"""The capability policy (fastcap/common/capability.py) at compute capabilities 6.0, 7.5, 8.0,
8.6, 8.9 and 9.0, without a GPU: torch's device queries are patched (``capability.simulate``),
and the precision, the training / inference dtypes, what ``auto`` dispatch picks per op, the
explicit-``triton`` refusal and the log lines are checked through the real callers."""

from __future__ import annotations

import logging

import pytest
import torch

from fastcap.api import default_dtype
from fastcap.common import capability
from fastcap.ops import dispatch
from fastcap.train import engine
from fastcap.train.config import ConfigError, TrainConfig

CUDA = torch.device("cuda")
# gpu -> (precision, {op: what auto picks}, opt-in shared memory per block in KB)
EXPECTED = {
    "p100": ("fp32", dict.fromkeys(("attention", "moe", "siglip", "lce"), "ref"), 48),
    "t4": ("fp16", {"attention": "ref", "moe": "ref", "siglip": "ref", "lce": "triton"}, 64),
    "a100": (
        "bf16",
        {"attention": "triton", "moe": "cuda", "siglip": "triton", "lce": "triton"},
        163,
    ),  # fmt: skip
    "a10": (
        "bf16",
        {"attention": "triton", "moe": "cuda", "siglip": "triton", "lce": "triton"},
        99,
    ),  # fmt: skip
    "l4": (
        "bf16",
        {"attention": "triton", "moe": "cuda", "siglip": "triton", "lce": "triton"},
        99,
    ),  # fmt: skip
    "h100": (
        "bf16",
        {"attention": "triton", "moe": "cuda", "siglip": "triton", "lce": "triton"},
        227,
    ),  # fmt: skip
}
CAPS = {"p100": (6, 0), "t4": (7, 5), "a100": (8, 0), "a10": (8, 6), "l4": (8, 9), "h100": (9, 0)}


@pytest.fixture(autouse=True)
def fresh_logs(monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setattr(capability, "_logged", set())
    monkeypatch.setenv("FASTCAP_KERNELS", "auto")


@pytest.fixture
def moe_cuda_loads(monkeypatch):
    """``moe=cuda`` counted as loadable (its own test, test_moe_align.py, builds the extension
    without CUDA and checks the refusal); here only the policy's order is under test."""
    real = dispatch._why_not

    def why_not(op, impl, device):
        if (op, impl) == ("moe", "cuda") and capability.triton_unavailable(device) is None:
            return None
        return real(op, impl, device)

    monkeypatch.setattr(dispatch, "_why_not", why_not)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_policy_per_capability(name, moe_cuda_loads, caplog):
    precision, impls, shared_kb = EXPECTED[name]
    with capability.simulate(name) as g, caplog.at_level(logging.INFO):
        assert g.capability == CAPS[name]
        # this torch's own answer is no guide below sm_80: emulation counts
        assert torch.cuda.is_bf16_supported() is True
        assert capability.precision_for(CUDA) == precision
        assert capability.shared_memory_limit(CUDA) == shared_kb * 1024
        assert engine.resolve_precision(TrainConfig(), CUDA) == precision
        want_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        assert default_dtype(CUDA) == want_dtype[precision]
        for op, impl in impls.items():
            assert [dispatch.resolve(op, CUDA) for _ in range(2)] == [impl, impl], op
        dispatch.validate(dispatch.OPS, CUDA)  # auto never raises
    msgs = [r.getMessage() for r in caplog.records]
    label = f"sm_{CAPS[name][0]}{CAPS[name][1]}"
    train = [m for m in msgs if m.startswith("fastcap.train: precision")]
    head = f"fastcap.train: precision {precision} (auto): {g.name} ({label})"
    assert len(train) == 1 and train[0].startswith(head), msgs
    load = [m for m in msgs if m.startswith("fastcap.load")]
    assert load == [f"fastcap.load: {precision} (auto): " + train[0].split("(auto): ", 1)[1]]
    for op, impl in impls.items():  # one line per op, with the GPU and the reason
        mine = [m for m in msgs if m.startswith(f"fastcap.ops: {op} ")]
        assert len(mine) == 1 and mine[0].startswith(f"fastcap.ops: {op} -> {impl} (auto): "), mine
        assert f"({label})" in mine[0], mine


def test_log_reasons_name_the_cause(moe_cuda_loads, caplog):
    with caplog.at_level(logging.INFO):
        with capability.simulate("t4"):
            engine.resolve_precision(TrainConfig(), CUDA)
            dispatch.resolve("attention", CUDA)
            dispatch.resolve("lce", CUDA)
        with capability.simulate("p100"):
            dispatch.resolve("siglip", CUDA)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "precision fp16 (auto): Tesla T4 (sm_75) has no native bf16" in text
    assert "attention -> ref (auto): Tesla T4 (sm_75): Triton's tl.dot has no tensor-core" in text
    assert "lce -> triton (auto): Tesla T4 (sm_75): cuBLAS GEMMs plus a Triton row-wise" in text
    assert "siglip -> ref (auto): Triton does not compile for Tesla P100-PCIE-16GB (sm_60)" in text


@pytest.mark.parametrize("spec", ["triton", "attention=triton", "moe=cuda"])
def test_explicit_triton_below_sm70_is_one_line_error_before_work(spec, monkeypatch):
    monkeypatch.setenv("FASTCAP_KERNELS", spec)
    op = spec.split("=")[0] if "=" in spec else "attention"
    with capability.simulate("p100"), pytest.raises(RuntimeError) as e:
        dispatch.validate((op,), CUDA)
    msg = str(e.value)
    assert "\n" not in msg
    assert "Triton does not compile for Tesla P100-PCIE-16GB (sm_60)" in msg, msg
    assert f"valid choices for {op}" in msg, msg


@pytest.mark.parametrize("spec", ["attention=triton", "siglip=triton", "moe=triton", "moe=cuda"])
def test_explicit_dot_kernels_below_sm80_are_refused(spec, monkeypatch):
    """On a T4, tl.dot runs on FMAs and every attention tile spills (the compile-only table's
    sm_75 rows): an explicit Triton choice for a tl.dot op is a one-line error at validate; the
    LCE, which has no tl.dot, runs."""
    monkeypatch.setenv("FASTCAP_KERNELS", spec)
    op = spec.split("=")[0]
    with capability.simulate("t4"), pytest.raises(RuntimeError) as e:
        dispatch.validate((op,), CUDA)
    msg = str(e.value)
    assert "\n" not in msg and "need compute capability 8.0" in msg and "Tesla T4 (sm_75)" in msg
    monkeypatch.setenv("FASTCAP_KERNELS", "lce=triton")
    with capability.simulate("t4"):
        assert dispatch.resolve("lce", CUDA) == "triton"
    with capability.simulate("a10"):  # sm_86
        monkeypatch.setenv("FASTCAP_KERNELS", "attention=triton")
        assert dispatch.resolve("attention", CUDA) == "triton"


@pytest.mark.parametrize("name", ["p100", "t4"])
def test_explicit_precision_the_gpu_lacks_is_a_config_error(name):
    with capability.simulate(name), pytest.raises(ConfigError) as e:
        engine.resolve_precision(TrainConfig(precision="bf16"), CUDA)
    assert "compute capability 8.0" in str(e.value) and "\n" not in str(e.value)
    with capability.simulate(name):
        if name == "p100":
            with pytest.raises(ConfigError, match="7.0"):
                engine.resolve_precision(TrainConfig(precision="fp16"), CUDA)
        else:
            assert engine.resolve_precision(TrainConfig(precision="fp16"), CUDA) == "fp16"
        assert engine.resolve_precision(TrainConfig(precision="fp32"), CUDA) == "fp32"


def test_cpu_and_unknown_capabilities():
    cpu = torch.device("cpu")
    assert capability.precision_for(cpu) == "fp32" and capability.gpu(cpu) is None
    assert engine.resolve_precision(TrainConfig(), cpu) == "fp32"
    assert default_dtype(cpu) == torch.float32
    # a torch without the opt-in property, and a capability newer than the table
    g = capability.GPU("future", (12, 1), 0)
    with capability.simulate(g), pytest.MonkeyPatch.context() as mp:
        props = torch.cuda.get_device_properties(0)
        del props.shared_memory_per_block_optin
        mp.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        assert capability.shared_memory_limit(CUDA) == capability.OPTIN_SHARED[(12, 0)]
        assert capability.precision_for("cuda:0") == "bf16"

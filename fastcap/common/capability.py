"""The capability policy: what each GPU gets (precision, an implementation per op, tile room).

One place answers the three questions whose answers depend on the GPU, for training
(``fastcap.train.engine.resolve_precision``), ``fastcap.load`` / ``fastcap-serve``
(``fastcap.api.default_dtype``), the op dispatch (``fastcap.ops.dispatch``, ``auto``), the
kernels' tile pruning and the benchmarks:

* :func:`precision_for` (device) -> ``"bf16" | "fp16" | "fp32"``: bf16 only where the GPU has it
  natively (compute capability >= 8.0); fp16 with loss scaling on sm_70 / sm_75 (V100, T4);
  fp32 below 7.0 (P100: DeepSpeed refuses fp16 there) and on the CPU.
  ``torch.cuda.is_bf16_supported()`` is NOT the test: with its default
  ``including_emulation=True`` it is True on a T4 (pytorch PR #148322), and the Triton kernels
  cannot compile bf16 below sm_80 (``Feature '.bf16' requires .target sm_80``).
* :func:`auto_order` (op, device) -> (implementations ``auto`` tries on this GPU, best first;
  the reason): from sm_80 the Triton kernels (``moe``: the CUDA routing sort first); on
  sm_70 / sm_75 the references (PyTorch SDPA, cuBLAS), because since Triton 3.3 ``tl.dot``
  below sm_80 runs on CUDA-core FMAs, not tensor cores (triton PR #5066) - except ``lce``,
  whose GEMMs are cuBLAS calls already and whose Triton kernel is a row-wise cross-entropy
  with no ``tl.dot`` (Liger-Kernel's design); below 7.0 the references only.
* :func:`triton_unavailable` (device, op) -> None or the reason an explicit ``triton`` cannot
  run: Triton does not target compute capability below 7.0, and the kernels built on ``tl.dot``
  (attention, MoE, SigLIP) are refused below 8.0, where ``tl.dot`` runs on FMAs and every
  attention tile spills (tests/gpu_compile.py's sm_75 rows: 0 HMMA); the LCE runs from 7.0.
* :func:`shared_memory_limit` (device) -> bytes of shared memory one block may opt in to
  (``cudaDevAttrMaxSharedMemoryPerBlockOptin``: A100 163 KB, sm_86 / sm_89 99 KB, T4 64 KB,
  H100 227 KB), which the kernels' tile pruning compares with each tile's need.

Everything is read from one torch query, ``torch.cuda.get_device_properties(device)``:
``major``, ``minor``, ``name``, ``total_memory``, ``shared_memory_per_block_optin`` (where this
torch has it; else :data:`OPTIN_SHARED` by capability), ``multi_processor_count``. That one
query, not ``get_device_capability``, because dynamo constant-folds it: the dispatch asks the
policy inside compiled code, where ``get_device_capability`` would break the graph. So a test
(or a fake-CUDA run) simulates any GPU by patching it; :func:`simulate` does that, and patches
``get_device_capability`` and ``is_bf16_supported`` to agree.

Nothing is cached: each call asks torch again (torch caches the properties itself), so a
patched query is seen at once. Decisions are logged once each, with the reason, by the callers
(:func:`log_once` here, on the ``fastcap`` logger family).
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch

log = logging.getLogger("fastcap.capability")

__all__ = [
    "GPU",
    "KNOWN_GPUS",
    "OPTIN_SHARED",
    "gpu",
    "precision_for",
    "explain_precision",
    "auto_order",
    "triton_unavailable",
    "shared_memory_limit",
    "log_once",
    "simulate",
]

# Opt-in shared memory per block by compute capability (CUDA C Programming Guide, "Technical
# Specifications per Compute Capability"; the driver keeps 1 KB of each SM's carve-out), used
# only when torch's device properties lack ``shared_memory_per_block_optin``.
OPTIN_SHARED: dict[tuple[int, int], int] = {
    (6, 0): 48 * 1024,
    (6, 1): 48 * 1024,
    (7, 0): 96 * 1024,
    (7, 5): 64 * 1024,
    (8, 0): 163 * 1024,
    (8, 6): 99 * 1024,
    (8, 7): 163 * 1024,
    (8, 9): 99 * 1024,
    (9, 0): 227 * 1024,
    (10, 0): 227 * 1024,
    (12, 0): 99 * 1024,
}
BF16_MIN = (8, 0)  # native bf16 (mma.sync bf16, PTX .bf16) from Ampere on
FP16_MIN = (7, 0)  # fp16 tensor cores; DeepSpeed's fp16 needs them
TRITON_MIN = (7, 0)  # the lowest target Triton's NVIDIA backend compiles for
TRITON_FAST_MIN = (8, 0)  # tl.dot on tensor cores (Triton >= 3.3)

# What ``auto`` tries on a GPU from sm_80 on, best first (``moe``: ``cuda`` is the same Triton
# GEMMs with the routing sort of the compiled extension).
FAST_ORDER: dict[str, tuple[str, ...]] = {
    "attention": ("triton",),
    "moe": ("cuda", "triton"),
    "siglip": ("triton",),
    "lce": ("triton",),
}
# Ops whose Triton code has no tl.dot (so nothing to lose below sm_80): the LCE's GEMMs are
# torch matmuls (cuBLAS) and its kernel is a row-wise softmax / cross-entropy.
NO_DOT_OPS = frozenset({"lce"})


@dataclass(frozen=True)
class GPU:
    """What the policy needs to know about one GPU."""

    name: str
    """As the driver reports it (``NVIDIA A100-SXM4-80GB``, ``Tesla T4``)."""
    capability: tuple[int, int]
    """Compute capability (major, minor): (7, 5) T4, (8, 0) A100, (8, 9) L4, (9, 0) H100."""
    shared_memory: int
    """Shared memory one block may opt in to, bytes (163 KB on an A100, 99 KB on sm_86/89)."""
    total_memory: int = 0
    """Device memory, bytes (0 when unknown)."""
    multi_processor_count: int = 0
    """SMs (0 when unknown)."""

    @property
    def arch(self) -> int:
        """``sm_XY`` as the integer XY (75, 80, 86, 89, 90): Triton's target number."""
        return self.capability[0] * 10 + self.capability[1]

    @property
    def bf16(self) -> bool:
        """Native bf16 (not the emulation ``torch.cuda.is_bf16_supported()`` also counts)."""
        return self.capability >= BF16_MIN

    def label(self) -> str:
        return f"{self.name} (sm_{self.arch})"


# GPUs people train on, for tests and fake-CUDA runs (:func:`simulate`); memory as sold.
_GiB = 2**30
KNOWN_GPUS: dict[str, GPU] = {
    "p100": GPU("Tesla P100-PCIE-16GB", (6, 0), 48 * 1024, 16 * _GiB, 56),
    "v100": GPU("Tesla V100-SXM2-16GB", (7, 0), 96 * 1024, 16 * _GiB, 80),
    "t4": GPU("Tesla T4", (7, 5), 64 * 1024, 15 * _GiB, 40),
    "a100": GPU("NVIDIA A100-SXM4-80GB", (8, 0), 163 * 1024, 80 * _GiB, 108),
    "a10": GPU("NVIDIA A10", (8, 6), 99 * 1024, 24 * _GiB, 72),
    "rtx3090": GPU("NVIDIA GeForce RTX 3090", (8, 6), 99 * 1024, 24 * _GiB, 82),
    "l4": GPU("NVIDIA L4", (8, 9), 99 * 1024, 24 * _GiB, 58),
    "rtx4090": GPU("NVIDIA GeForce RTX 4090", (8, 9), 99 * 1024, 24 * _GiB, 128),
    "h100": GPU("NVIDIA H100 80GB HBM3", (9, 0), 227 * 1024, 80 * _GiB, 132),
    "h200": GPU("NVIDIA H200", (9, 0), 227 * 1024, 141 * _GiB, 132),
}


def _index(device: torch.device | str | int | None) -> torch.device | int | None:
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device) and device.index is None:
        return None  # the current device, as torch's queries take it
    return device


def gpu(device: torch.device | str | int | None = None) -> GPU | None:
    """The GPU behind ``device`` (None for a non-CUDA device), from torch's queries."""
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device) and device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(_index(device))
    cap = (int(props.major), int(props.minor))
    optin = getattr(props, "shared_memory_per_block_optin", 0) or OPTIN_SHARED.get(cap)
    if not optin:  # a capability not in the table: the next lower one that is
        lower = [c for c in OPTIN_SHARED if c <= cap]
        optin = OPTIN_SHARED[max(lower)] if lower else 48 * 1024
    return GPU(
        name=str(getattr(props, "name", "CUDA device")),
        capability=cap,
        shared_memory=int(optin),
        total_memory=int(getattr(props, "total_memory", 0) or 0),
        multi_processor_count=int(getattr(props, "multi_processor_count", 0) or 0),
    )


def explain_precision(device: torch.device | str) -> tuple[str, str]:
    """(precision, reason) for training or inference on ``device``; see :func:`precision_for`."""
    g = gpu(device)
    if g is None:
        return "fp32", "not a GPU"
    if g.capability >= BF16_MIN:
        return "bf16", f"{g.label()} has native bf16"
    if g.capability >= FP16_MIN:
        return "fp16", f"{g.label()} has no native bf16; fp16 tensor cores with loss scaling"
    return "fp32", f"{g.label()} is below sm_70: no fp16 tensor cores (DeepSpeed refuses fp16)"


def precision_for(device: torch.device | str) -> str:
    """``"bf16"`` (compute capability >= 8.0), ``"fp16"`` (7.0 - 7.5, with loss scaling) or
    ``"fp32"`` (below 7.0, and every non-CUDA device)."""
    return explain_precision(device)[0]


def inference_dtype(device: torch.device | str, who: str = "fastcap.load") -> torch.dtype:
    """The torch dtype of :func:`precision_for` for inference on ``device``, logged once with
    the reason on ``fastcap.api`` (``who`` names the caller: fastcap.load, fastcap-caption)."""
    precision, why = explain_precision(device)
    log_once(logging.getLogger("fastcap.api"), f"{who}: {precision} (auto): {why}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def triton_unavailable(device: torch.device | str, op: str | None = None) -> str | None:
    """None if the Triton kernels of ``op`` (any op: None) can run on ``device``'s GPU, else
    why not (a one-line reason). A non-CUDA device returns None: that case is the dispatch's
    own check."""
    g = gpu(device)
    if g is None:
        return None
    if g.capability < TRITON_MIN:
        return (
            f"Triton does not compile for {g.label()}: it needs compute capability "
            f"{TRITON_MIN[0]}.{TRITON_MIN[1]} or higher"
        )
    if op is not None and op not in NO_DOT_OPS and g.capability < TRITON_FAST_MIN:
        return (
            f"the Triton {op} kernels need compute capability 8.0 or higher ({g.label()}): "
            "below it tl.dot has no tensor cores and its FMA code spills; the reference is "
            "faster there"
        )
    return None


def auto_order(op: str, device: torch.device | str) -> tuple[tuple[str, ...], str]:
    """(implementations ``auto`` tries for ``op`` on ``device``'s GPU, best first; the reason).
    An empty order means the reference. ``device`` must be a CUDA device."""
    g = gpu(device)
    if g is None:
        raise ValueError(f"auto_order: {device} is not a CUDA device")
    if g.capability >= TRITON_FAST_MIN:
        return FAST_ORDER[op], f"{g.label()}: Triton's tl.dot runs on tensor cores from sm_80"
    if g.capability < TRITON_MIN:
        return (), triton_unavailable(device) or ""
    if op in NO_DOT_OPS:
        return FAST_ORDER[op], (
            f"{g.label()}: cuBLAS GEMMs plus a Triton row-wise cross-entropy (no tl.dot)"
        )
    return (), (
        f"{g.label()}: Triton's tl.dot has no tensor-core path below sm_80 (FMA since Triton "
        "3.3); the reference runs on PyTorch SDPA / cuBLAS, which use the tensor cores"
    )


def shared_memory_limit(device: torch.device | str | int | None = None) -> int:
    """Bytes of shared memory one block on ``device`` may opt in to."""
    g = gpu(device)
    if g is None:
        raise ValueError(f"shared_memory_limit: {device} is not a CUDA device")
    return g.shared_memory


_logged: set[str] = set()


def log_once(logger: logging.Logger, msg: str, level: int = logging.INFO) -> None:
    """Log ``msg`` on ``logger`` the first time this process sees it."""
    if msg not in _logged:
        _logged.add(msg)
        logger.log(level, msg)


@contextlib.contextmanager
def simulate(which: str | GPU) -> Iterator[GPU]:
    """Make torch's device queries describe ``which`` (a :data:`KNOWN_GPUS` key or a GPU),
    without a GPU: ``torch.cuda.get_device_capability``, ``get_device_properties`` and
    ``is_bf16_supported`` (True on any GPU, as this torch answers by default, emulation
    included; native only with ``including_emulation=False``). ``torch.cuda.is_available``
    is left alone: patching it sends torch to the real runtime."""
    g = KNOWN_GPUS[which] if isinstance(which, str) else which
    props = types.SimpleNamespace(
        name=g.name,
        major=g.capability[0],
        minor=g.capability[1],
        total_memory=g.total_memory,
        multi_processor_count=g.multi_processor_count,
        shared_memory_per_block_optin=g.shared_memory,
        shared_memory_per_block=48 * 1024,
        warp_size=32,
    )

    def bf16(including_emulation: bool = True) -> bool:
        return g.bf16 or including_emulation

    with (
        mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: g.capability),
        mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: props),
        mock.patch.object(torch.cuda, "is_bf16_supported", bf16),
    ):
        yield g

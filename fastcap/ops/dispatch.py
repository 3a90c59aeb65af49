"""The one place that reads ``FASTCAP_KERNELS`` and picks an implementation per op.

Grammar (see docs/DESIGN.md, section 2 "The op seam"):

* ``auto`` (default): the PyTorch reference for CPU tensors; for CUDA tensors what the
  capability policy (:func:`fastcap.common.capability.auto_order`) orders for that GPU: the
  Triton kernels (``moe``: the CUDA routing sort first) from sm_80 on; on sm_70 / sm_75 the
  references (SDPA, cuBLAS: Triton's ``tl.dot`` has no tensor-core path there) except ``lce``
  (cuBLAS GEMMs + a Triton row-wise CE); below sm_70 the references. Logged once per op with
  the reason.
* ``ref`` | ``triton`` | ``cuda``: force that implementation for every op that has one. Every
  op has ``ref`` and ``triton``; only ``moe`` has ``cuda`` (its routing alignment is the C++/CUDA
  extension), so a bare ``cuda`` forces ``moe=cuda`` and leaves the other ops at ``auto``,
  which is logged once per op: a bare choice is a default, never a silent substitute.
* ``attention=ref,moe=triton``: per op; unlisted ops stay ``auto``. A bare choice may be mixed
  in as the default for the rest: ``ref,moe=triton``. A per-op choice the op does not have
  (``attention=cuda``) is an error.

An explicit choice that cannot run raises (``ValueError`` for a name that does not exist,
``RuntimeError`` for one that exists but cannot run here), always listing the valid choices.
Only ``auto`` falls back, and it logs that once per (op, reason).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable

import torch

from fastcap.common import capability

log = logging.getLogger("fastcap.ops")

ENV = "FASTCAP_KERNELS"
CHOICES = ("auto", "ref", "triton", "cuda")

# op -> implementation -> "module:function". The references never import Triton.
IMPLS: dict[str, dict[str, str]] = {
    "attention": {
        "ref": "fastcap.ops.ref.attention:attention",
        "triton": "fastcap.kernels.attention:attention",
    },
    "moe": {
        "ref": "fastcap.ops.ref.moe:moe_ffn",
        "triton": "fastcap.kernels.moe:moe_ffn",
        "cuda": "fastcap.kernels.moe:moe_ffn_cuda",
    },
    "siglip": {
        "ref": "fastcap.ops.ref.siglip:siglip_loss",
        "triton": "fastcap.kernels.siglip:siglip_loss",
    },
    "lce": {
        "ref": "fastcap.ops.ref.lce:linear_cross_entropy",
        "triton": "fastcap.kernels.lce:linear_cross_entropy",
    },
}
OPS = tuple(IMPLS)
# What ``auto`` prefers on CUDA tensors of a GPU from sm_80 on, best first; older GPUs get the
# order of fastcap.common.capability.auto_order.
AUTO_CUDA_ORDER: dict[str, tuple[str, ...]] = capability.FAST_ORDER


def parse(spec: str | None) -> dict[str, str]:
    """Parse a ``FASTCAP_KERNELS`` string into {op: choice} for every op. Raises ValueError."""
    spec = (spec or "auto").strip()
    default = "auto"
    per_op: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" in part:
            op, choice = (s.strip() for s in part.split("=", 1))
            if op not in IMPLS:
                raise ValueError(
                    f"{ENV}: unknown op {op!r} in {spec!r}; valid ops: {', '.join(OPS)}"
                )
            if choice not in CHOICES:
                raise ValueError(
                    f"{ENV}: unknown choice {choice!r} for {op}; valid choices: "
                    f"{', '.join(('auto', *IMPLS[op]))}"
                )
            per_op[op] = choice
        else:
            if part not in CHOICES:
                raise ValueError(
                    f"{ENV}: unknown choice {part!r}; valid: {', '.join(CHOICES)} or "
                    f"per op like 'attention=ref,moe=triton' (ops: {', '.join(OPS)})"
                )
            default = part
    # a bare default applies where the op has that implementation (see the module docstring)
    return {
        op: per_op.get(op, default if default == "auto" or default in IMPLS[op] else "auto")
        for op in OPS
    }


def _bare_default(spec: str | None) -> str | None:
    """The bare choice in a spec (``cuda`` in ``cuda,attention=ref``), if any."""
    parts = [p.strip() for p in (spec or "").split(",")]
    bare = [p for p in parts if p and "=" not in p]
    return bare[-1] if bare else None


def current() -> dict[str, str]:
    """The choice per op from the environment (read on every call: tests flip it)."""
    return parse(os.environ.get(ENV))


_loaded: dict[str, Callable] = {}


def _load(path: str) -> Callable:
    # Plain dicts, not functools.cache or a bare import_module: torch.compile traces dict
    # lookups (guards on globals) but not importlib, which would be a graph break. So under
    # compile only a module never imported before (nor by dispatch.validate) breaks the graph.
    fn = _loaded.get(path)
    if fn is None:
        module, name = path.split(":")
        mod = sys.modules.get(module) or importlib.import_module(module)
        fn = _loaded[path] = getattr(mod, name)
    return fn


# The GPU's answers, as constants to dynamo: resolve() runs inside compiled code (the public ops
# call dispatch.get), where the device queries and the extension check would break the graph.
@torch.compiler.assume_constant_result
def _policy(op: str, device: torch.device) -> tuple[tuple[str, ...], str]:
    return capability.auto_order(op, device)


@torch.compiler.assume_constant_result
def _triton_refused(op: str, device: torch.device) -> str | None:
    return capability.triton_unavailable(device, op)


@torch.compiler.assume_constant_result
def _no_cuda_kernel() -> str | None:
    from fastcap.common.moe_align import cuda_unavailable

    return cuda_unavailable()


def _valid(op: str) -> str:
    return ", ".join(("auto", *IMPLS[op]))


def _why_not(op: str, impl: str, device: torch.device) -> str | None:
    """None if ``impl`` of ``op`` can run on tensors of ``device``, else the reason."""
    if impl == "ref":
        return None
    if impl not in IMPLS[op]:
        return f"{op} has no {impl!r} implementation"
    if impl in ("triton", "cuda"):
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not (impl == "triton" and interpret):
            need = "CUDA tensors or TRITON_INTERPRET=1" if impl == "triton" else "CUDA tensors"
            return f"{op}={impl} needs {need} (got {device.type} tensors)"
        if device.type == "cuda":
            why = _triton_refused(op, device)  # moe=cuda: Triton GEMMs too
            if why is not None:
                return f"{op}={impl}: {why}"
    try:
        _load(IMPLS[op][impl])
    except (ImportError, AttributeError, RuntimeError, OSError) as e:
        return f"{op}={impl} is not available here ({type(e).__name__}: {e})"
    if impl == "cuda" and device.type == "cuda":
        # the extension imported, but a build without a CUDA toolkit has no CUDA kernel: ask
        # the dispatcher (else the first MoE forward raises NotImplementedError)
        why = _no_cuda_kernel()
        if why is not None:
            return f"{op}={impl} is not available here ({why})"
    return None


_logged: set[tuple[str, str]] = set()


def _log_once(op: str, msg: str, level: int = logging.INFO) -> None:
    if torch.compiler.is_compiling():  # dynamo cannot trace a logger call; eager calls log it
        return
    if (op, msg) not in _logged:
        _logged.add((op, msg))
        log.log(level, msg)


def resolve(op: str, device: torch.device, *, quiet: bool = False) -> str:
    """Name of the implementation of ``op`` to use for tensors on ``device`` (``quiet``: do
    not log the choice, for a check made before logging is set up)."""
    spec = os.environ.get(ENV)
    choice = parse(spec)[op]
    bare = _bare_default(spec)
    if not quiet and choice == "auto" and bare not in (None, "auto") and bare not in IMPLS[op]:
        _log_once(
            op,
            f"fastcap.ops: {op} has no {bare!r} implementation; {ENV}={spec} leaves it at auto",
            logging.WARNING,
        )
    if choice != "auto":
        why = _why_not(op, choice, device)
        if why is not None:
            err = ValueError if choice not in IMPLS[op] else RuntimeError
            raise err(f"{ENV}: {why}; valid choices for {op}: {_valid(op)}")
        return choice
    if device.type != "cuda":
        return "ref"
    order, policy = _policy(op, device)
    if not order:
        if not quiet:
            _log_once(op, f"fastcap.ops: {op} -> ref (auto): {policy}")
        return "ref"
    reasons = []
    for impl in order:
        why = _why_not(op, impl, device)
        if why is None:
            if not quiet:
                _log_once(op, f"fastcap.ops: {op} -> {impl} (auto): {policy}")
            return impl
        reasons.append(why)
    if not quiet:
        _log_once(op, f"fastcap.ops: {op} falls back to ref (auto): {'; '.join(reasons)}")
    return "ref"


def get(op: str, device: torch.device) -> Callable:
    """The function implementing ``op`` for tensors on ``device``."""
    return _load(IMPLS[op][resolve(op, device)])


def validate(ops: tuple[str, ...], device: torch.device) -> None:
    """Raise now, before any work, if the flag names something that cannot run for these ops
    on ``device`` (the same errors as the first call would raise)."""
    for op in ops:
        resolve(op, device, quiet=True)

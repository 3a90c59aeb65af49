"""``moe_align``: sort (token, choice) pairs by expert and pad each expert to whole blocks.

The grouped GEMMs of :mod:`fastcap.kernels.moe` walk the routed pairs in blocks of ``block_m``
rows that all belong to one expert. ``moe_align`` produces that layout; it is a counting sort of
the T*k pairs (pair ``p = t*k + c`` indexes ``topk_ids.view(-1)``) by expert id:

* ``sorted_token_ids`` (max_padded,) int32: the pairs of expert 0, then expert 1, ..., each
  expert's pairs in increasing ``p`` (stable, so every reduction downstream is deterministic) and
  its segment padded with the sentinel ``T*k`` to a multiple of ``block_m``; sentinel past the end.
* ``expert_ids`` (max_padded // block_m,) int32: the expert of each block, -1 for unused blocks.
* ``num_tokens_post_pad`` (1,) int32: the slots in use (a multiple of ``block_m``).

``max_padded = roundup(T*k + min(E, T*k) * (block_m - 1), block_m)`` depends only on the sizes,
so a GPU caller sizes its grid without a device-to-host copy.

Three implementations return identical tensors:

* the compiled extension ``fastcap_C`` (``csrc/moe_align.cpp`` on the CPU,
  ``csrc/moe_align_cuda.cu`` on CUDA), registered as the torch op ``torch.ops.fastcap.moe_align``.
  It is built with ninja on first use by :func:`load_extension` through
  ``torch.utils.cpp_extension.load`` and cached in ``$FASTCAP_EXT_DIR`` (default
  ``~/.cache/fastcap/extensions/<torch version>-<cuXYZ|cpu>-py<XY>/``); later processes only
  load the cached library. The CUDA source is compiled only when torch sees a GPU and nvcc is
  found; otherwise the build is CPU-only (12 s the first time on a 2-core machine). That is the
  usual GPU machine with torch from pip: a compiler, no CUDA toolkit. Such a build registers
  no CUDA kernel, so :func:`cuda_unavailable` asks the dispatcher whether the op has one (an
  import that succeeded proves nothing) and says why not.
* :func:`moe_align_torch`, pure PyTorch, no host synchronisation on CUDA.

:func:`moe_align` with ``impl="auto"`` uses the extension when it can be built (and, for CUDA
tensors, has its CUDA kernel) and otherwise falls back to PyTorch, saying so once in the log;
``impl="ext"`` raises ``RuntimeError`` with the build error, or the missing toolkit, instead.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("fastcap.ops")  # beside the dispatch's choices, where users look

__all__ = [
    "moe_align",
    "moe_align_torch",
    "load_extension",
    "cuda_unavailable",
    "max_padded",
    "csrc_dir",
]

_HERE = Path(__file__).resolve()
EXT_NAME = "fastcap_C"
# The CUDA kernel keeps (warps + 1) * E counters in shared memory.
CUDA_MAX_EXPERTS = 1024

_ext_state: dict[str, object] = {}  # "ok": True, or "error": the build's exception (not retried)


def max_padded(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Slots of ``sorted_token_ids``: an upper bound on the padded pair count, from sizes only."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-bound // block_m) * block_m


def _check(topk_ids: Tensor, num_experts: int, block_m: int) -> None:
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"moe_align: topk_ids must be int32/int64 (T, k); got {topk_ids.dtype} "
            f"{tuple(topk_ids.shape)}"
        )
    if num_experts < 1 or block_m < 1:
        raise ValueError(
            f"moe_align: num_experts and block_m must be >= 1; got {num_experts}, {block_m}"
        )


def moe_align_torch(topk_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, ...]:
    """Pure-PyTorch ``moe_align`` (see the module docstring for the outputs).

    Args:
        topk_ids: (T, k) int32/int64 expert ids in [0, num_experts).
        num_experts: E.
        block_m: rows per block of the grouped GEMM.

    Returns:
        sorted_token_ids (max_padded,), expert_ids (max_padded // block_m,),
        num_tokens_post_pad (1,), all int32 on topk_ids' device.
    """
    _check(topk_ids, num_experts, block_m)
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()  # (P,)
    P = flat.numel()
    slots = max_padded(P, num_experts, block_m)
    if dev.type == "cpu" and P and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"moe_align: topk_ids must lie in [0, {num_experts})")
    # index_add, not bincount: bincount synchronises on CUDA to find its length.
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev)
    counts.index_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # (E,)
    seg_end = torch.cumsum(padded, 0)  # (E,) end slot of each expert's segment
    seg_start = seg_end - padded
    first = torch.cumsum(counts, 0) - counts  # (E,) first index of each expert in `order`
    order = torch.argsort(flat, stable=True)  # (P,) pairs by expert, increasing p inside
    e_sorted = flat[order]
    pos = seg_start[e_sorted] + torch.arange(P, device=dev) - first[e_sorted]
    sorted_ids = torch.full((slots,), P, dtype=torch.int32, device=dev)
    sorted_ids[pos] = order.to(torch.int32)
    total = seg_end[-1:]
    blk_start = torch.arange(0, slots, block_m, device=dev)  # (slots // block_m,)
    expert_ids = torch.searchsorted(seg_end, blk_start, right=True)
    expert_ids = torch.where(blk_start < total, expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, total.to(torch.int32)


def csrc_dir() -> Path:
    """The extension's sources: ``<repo>/csrc`` in a checkout or editable install, else the
    ``fastcap/csrc`` package data of a regular install."""
    for cand in (_HERE.parents[2] / "csrc", _HERE.parents[1] / "csrc"):
        if (cand / "moe_align.cpp").is_file():
            return cand
    raise FileNotFoundError(f"fastcap: moe_align.cpp not found in {_HERE.parents[2] / 'csrc'}")


def _build_dir(with_cuda: bool) -> Path:
    root = os.environ.get("FASTCAP_EXT_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "fastcap" / "extensions"
    dev = f"cu{torch.version.cuda.replace('.', '')}" if with_cuda else "cpu"
    tag = (
        f"torch{torch.__version__.split('+')[0]}-{dev}-py{sys.version_info[0]}{sys.version_info[1]}"
    )
    return base / tag


def load_extension() -> None:
    """Build (first time) and load ``fastcap_C``, registering ``torch.ops.fastcap.moe_align``.

    Raises:
        RuntimeError: the extension cannot be built or loaded here (no compiler, no ninja, a
            compile error); the message carries the cause. A failure is remembered, not retried.
    """
    if "ok" in _ext_state:
        return
    if "error" in _ext_state:
        raise RuntimeError(f"fastcap_C extension unavailable: {_ext_state['error']}")
    try:
        from torch.utils import cpp_extension

        with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
        if not with_cuda:  # why the CUDA kernel is left out, for cuda_unavailable
            _ext_state["no_cuda"] = (
                "no CUDA toolkit found (nvcc not on PATH, CUDA_HOME unset): install the CUDA "
                f"{torch.version.cuda} toolkit or set CUDA_HOME, and the next process builds "
                "the CUDA kernel (into its own folder)"
                if torch.cuda.is_available()
                else "torch saw no GPU when it was built"
            )
        csrc = csrc_dir()
        sources = [str(csrc / "moe_align.cpp")]
        if with_cuda:
            sources.append(str(csrc / "moe_align_cuda.cu"))
        build = _build_dir(with_cuda)
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=EXT_NAME,
            sources=sources,
            build_directory=str(build),
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            with_cuda=with_cuda,
            is_python_module=False,  # the library only registers torch ops
        )

        @torch.library.register_fake("fastcap::moe_align")
        def _(topk_ids: Tensor, num_experts: int, block_m: int):
            slots = max_padded(topk_ids.numel(), num_experts, block_m)
            new = lambda n: topk_ids.new_empty((n,), dtype=torch.int32)
            return new(slots), new(slots // block_m), new(1)

    except Exception as e:  # noqa: BLE001 - any build/load failure means "unavailable"
        _ext_state["error"] = f"{type(e).__name__}: {e}"
        raise RuntimeError(f"fastcap_C extension unavailable: {_ext_state['error']}") from e
    _ext_state["ok"] = True


def cuda_unavailable() -> str | None:
    """None if ``torch.ops.fastcap.moe_align`` has a CUDA kernel, else why not (one line).

    Builds or loads the extension first. The test is the dispatcher's own: is a kernel
    registered for the op under the CUDA dispatch key (a CPU-only build registers none, and a
    CUDA call would raise NotImplementedError at the first MoE forward)."""
    try:
        load_extension()
    except RuntimeError as e:
        return str(e)
    if torch._C._dispatch_has_kernel_for_dispatch_key("fastcap::moe_align", "CUDA"):
        return None
    why = _ext_state.get("no_cuda", "its CUDA source was not compiled")
    return f"fastcap_C was built without its CUDA kernel: {why}"


def moe_align(
    topk_ids: Tensor, num_experts: int, block_m: int, *, impl: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """Sort routed pairs by expert, each expert padded to a multiple of ``block_m``.

    Args:
        topk_ids: (T, k) int32/int64 expert ids in [0, num_experts).
        num_experts: E.
        block_m: rows per block.
        impl: ``"ext"`` the compiled extension (raises RuntimeError if it cannot be built),
            ``"torch"`` the PyTorch version, ``"auto"`` the extension if available, else PyTorch
            (logged once).

    Returns:
        sorted_token_ids (max_padded,), expert_ids (max_padded // block_m,),
        num_tokens_post_pad (1,), int32, on topk_ids' device; see the module docstring.
    """
    if impl not in ("auto", "ext", "torch"):
        raise ValueError(f"moe_align: impl must be one of auto, ext, torch; got {impl!r}")
    _check(topk_ids, num_experts, block_m)
    if impl == "torch":
        return moe_align_torch(topk_ids, num_experts, block_m)
    if impl == "auto":
        try:
            load_extension()
            why = cuda_unavailable() if topk_ids.is_cuda else None
            if why is not None:
                raise RuntimeError(why)
        except RuntimeError as e:
            if "logged" not in _ext_state:
                _ext_state["logged"] = True
                log.info("fastcap.ops: moe_align falls back to PyTorch (auto): %s", e)
            return moe_align_torch(topk_ids, num_experts, block_m)
    else:
        load_extension()
        why = cuda_unavailable() if topk_ids.is_cuda else None
        if why is not None:
            raise RuntimeError(why)
    if topk_ids.is_cuda and num_experts > CUDA_MAX_EXPERTS:
        if impl == "ext":
            raise ValueError(
                f"moe_align: the CUDA kernel supports at most {CUDA_MAX_EXPERTS} experts, "
                f"got {num_experts}"
            )
        return moe_align_torch(topk_ids, num_experts, block_m)
    return torch.ops.fastcap.moe_align(topk_ids, num_experts, block_m)

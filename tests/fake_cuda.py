"""Fake CUDA: run fastcap's GPU code paths on a CPU, with tensors that carry a device, a dtype
and a shape but no data (``torch._subclasses.fake_tensor.FakeTensorMode``).

What it checks is the contract a GPU enforces and a CPU run never sees: every op's operands
on one device (a CPU tensor meeting a CUDA tensor raises ``FakeTensorDeviceMismatchError``,
0-d CPU scalars excepted, as on a GPU), matching dtypes where PyTorch requires them (a GEMM or
a convolution of fp32 against bf16 raises), the custom ops' fake implementations (what
``auto`` dispatch reaches on CUDA tensors: the Triton kernels' shapes, strides and dtypes),
and the precision and kernel choice the capability policy (:mod:`fastcap.common.capability`)
makes for a named GPU, simulated by :func:`fastcap.common.capability.simulate`.

:class:`FakeGPU` is the context a case runs in::

    with FakeGPU("a100") as g:
        model = g.to_cuda(Captioner(cfg), torch.bfloat16)   # params -> fake cuda:0 bf16
        out = model(images, tokens, lens)
        grads = g.backward(out["loss"])                     # {parameter: gradient}

Besides the mode's own errors it records, for the case to assert on:

* ``g.host_reads``: every read of a device value by the host (``.item()``, ``bool(t)``,
  ``int(t)``: a synchronisation on a GPU), with the fastcap line that made it. A fake tensor
  holds no value, so each read answers by a policy: bool False, float 0.0, int ``int_read``
  (settable; decoding reads ``lens.max()``, which is the full length when no row finished,
  and no row does when every "did any row finish?" answers False). Values computed from these
  answers are placeholders: the cases check devices, dtypes and shapes, never numbers.
* ``g.cpu_made``: tensors of more than one element created on the CPU inside the case, with
  the fastcap line that made them (a CPU tensor in a GPU path is a host round trip at best and
  an error in a collective at worst); the cases allow only the documented ones.
* ``g.fp32_gemms``: matrix products and convolutions computed in fp32 when the case runs the
  model in fp16/bf16, with their line (the router's logits are fp32 on purpose; any other is
  a lost tensor-core rate).

**The backward.** PyTorch's autograd engine cannot run on fake CUDA tensors without a driver
(it asks the CUDA runtime for the device's primary context and stream: ``hasPrimaryContext
expects a valid device index``). :meth:`FakeGPU.backward` runs the same graph without the
engine: it walks ``grad_fn`` in topological order and calls each node (aten's derivative
formulas, the custom ops' registered backward, ``torch.autograd.Function`` backwards), doing
what the engine's ``validate_outputs`` does between nodes: a gradient on another device than
its input is an error, a gradient of another dtype is cast, one of a broadcast shape is
summed to size. Gradient hooks, ``retain_graph`` bookkeeping and streams are not modelled;
leaf gradients are returned, not accumulated into ``.grad``.

Where a meta kernel checks less than the real one, :class:`FakeGPU` adds the check: matrix
products and convolutions (``mm``, ``bmm``, ``addmm``, ``convolution``...) of operands of two
dtypes, and ``index_put_`` (``out[mask] = y``), ``index_copy_``, ``index_add_`` and
``masked_scatter_`` with a source of another dtype than the destination, raise on CUDA and
the CPU, and their meta kernels (this torch) let them through; the mode raises for them.
Other such gaps may exist: a fake run proves the contracts the meta kernels check (plus
these), not every check of every real kernel.

What cannot run this way, and why:

* DeepSpeed's engine (ZeRO-3 partitioning, its fp16 loss scaler, its optimizer step): it
  allocates flat buffers, streams and events on the real device and calls NCCL. The cases
  drive ``StepRunner`` with a stand-in engine that calls the model and :meth:`backward`.
* NCCL and every collective: no process group spans fake tensors. ``collectives.py`` is run
  at a world of one, and its tensors' devices are checked (what NCCL would reject).
* Numbers: kernels' numerics, loss values, which tokens decoding picks, whether rows finish.
  Covered by the interpreter tests (``tests/test_attention.py`` etc.) and ``bench/gpu_check``.
* Autotuning, tile fit in shared memory, register spills: ``tests/gpu_compile.py``.
* CUDA graph capture and replay (``torch.cuda.graph`` needs the driver): static decoding runs
  its eager path (the captured step is the same function).
* ``torch.cuda.is_available()`` stays False: patching it sends torch's own code to the real
  runtime. Code that branches on it (pinned memory, RNG state in checkpoints, the
  ``fastcap.load`` default device) takes the CPU branch; the cases pass the device instead.
"""

from __future__ import annotations

import contextlib
import re
import traceback
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fastcap.common import capability

REPO = Path(__file__).resolve().parents[1]
_OURS = (str(REPO / "fastcap") + "/", str(REPO / "kernels") + "/")
_GEMMS = {
    "mm",
    "bmm",
    "addmm",
    "baddbmm",
    "matmul",
    "convolution",
    "_convolution",
    "cudnn_convolution",
}
_FACTORY_DENY = {"_local_scalar_dense", "lift_fresh", "lift_fresh_copy"}
# Ops whose real kernels refuse a source of another dtype than the destination but whose meta
# implementations (what a fake tensor runs) do not check: (op, index of the source argument).
_SAME_DTYPE = {
    "index_put": 2,
    "index_put_": 2,
    "_index_put_impl_": 2,
    "index_copy": 3,
    "index_copy_": 3,
    "index_add": 3,
    "index_add_": 3,
    "masked_scatter": 2,
    "masked_scatter_": 2,
}


def where() -> str:
    """``path:function:line`` of the innermost fastcap frame of the current stack; inside
    :meth:`FakeGPU.backward`, ``backward of <the forward's line>``; else '?'."""
    if _node_name[0] is not None:
        return _node_name[0]
    for fr in reversed(traceback.extract_stack()[:-1]):
        if fr.filename.startswith(_OURS):
            return f"{Path(fr.filename).relative_to(REPO)}:{fr.name}:{fr.lineno}"
    return "?"


_node_name: list[str | None] = [None]  # the autograd node FakeGPU.backward is running
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _forward_site(node) -> str:
    """``path:function:line`` of the fastcap line whose forward made ``node`` (anomaly mode
    keeps the forward's stack in the node's metadata), else the node's name."""
    for line in reversed(node.metadata.get("traceback_", [])):
        m = _FRAME.search(line)
        if m and m.group(1).startswith(_OURS):
            return f"{Path(m.group(1)).relative_to(REPO)}:{m.group(3)}:{m.group(2)}"
    return node.name()


def site(w: str) -> str:
    """``path:function`` of a :func:`where` string (what allow-lists name: lines move)."""
    w = w.removeprefix("backward of ")
    return w.rsplit(":", 1)[0] if w.count(":") >= 2 else w


class _Mode(FakeTensorMode):
    """A FakeTensorMode that answers host reads by policy and records what :class:`FakeGPU`
    reports."""

    def __init__(self, gpu: FakeGPU):
        # real CPU tensors (a state dict, a tokenizer's ids) may enter ops: they become fake
        # CPU tensors, so a CPU tensor meeting a CUDA one still raises
        super().__init__(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
        self.gpu = gpu

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            return self.gpu._read(args[0])
        if name in _GEMMS:
            dts = {a.dtype for a in args if isinstance(a, torch.Tensor)}
            if len(dts) > 1:
                raise RuntimeError(
                    f"{name}: operands of dtypes {sorted(map(str, dts))} (a real kernel raises; "
                    f"the meta kernel does not check) at {where()}"
                )
        src = _SAME_DTYPE.get(name)
        if (
            src is not None
            and len(args) > src
            and isinstance(args[src], torch.Tensor)
            and args[src].dtype != args[0].dtype
        ):
            raise RuntimeError(
                f"{name}: source dtype {args[src].dtype} != destination dtype "
                f"{args[0].dtype} (a real kernel raises; the meta kernel does not check) "
                f"at {where()}"
            )
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.gpu.recording:
            self.gpu._observe(func, name, args, out)
        return out


def _module_to(gpu: FakeGPU):
    """``nn.Module.to`` that moves to the fake GPU by swapping tensors (see
    :meth:`FakeGPU.to_cuda`), as ``module.to("cuda", dtype)`` would; other moves as usual."""
    real_to = torch.nn.Module.to

    def to(module, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type == "cuda":
            return gpu.to_cuda(module, dtype)
        return real_to(module, *args, **kwargs)

    return to


class FakeGPU:
    """A fake CUDA device described as the GPU ``name`` (a key of
    :data:`fastcap.common.capability.KNOWN_GPUS`: ``a100``, ``h100``, ``t4``...)."""

    def __init__(self, name: str = "a100", *, int_read: int = 1):
        self.name = name
        self.info = capability.KNOWN_GPUS[name]
        self.int_read = int_read
        self.host_reads: list[tuple[str, str]] = []  # ("cuda bool", where)
        self.cpu_made: dict[str, set[str]] = defaultdict(set)  # where -> ops
        self.fp32_gemms: dict[str, set[str]] = defaultdict(set)
        self.compute_dtype: torch.dtype | None = None  # set by to_cuda for the fp32 GEMM record
        self.captures: list[dict] = []  # what each CUDA-graph capture did (cuda_graphs)
        self.replays = 0
        self.recording = True
        self.mode = _Mode(self)
        self._sim = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> FakeGPU:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(capability.simulate(self.info))
        self._stack.enter_context(mock.patch.object(torch.nn.Module, "to", _module_to(self)))
        # anomaly mode keeps each autograd node's forward stack: backward ops are then
        # reported at the fastcap line whose forward made them
        self._stack.enter_context(torch.autograd.set_detect_anomaly(True, check_nan=False))
        self._stack.enter_context(self.mode)
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)

    # ------------------------------------------------------------------ moving things
    def fake(self, t: torch.Tensor, device=None, dtype=None) -> torch.Tensor:
        """A real tensor -> a fake one on ``device`` (default the fake GPU) in ``dtype``
        (default its own; floating tensors only are cast)."""
        was, self.recording = self.recording, False  # the harness's own copies
        try:
            f = t if isinstance(t, FakeTensor) else self.mode.from_tensor(t, static_shapes=True)
            if dtype is not None and t.is_floating_point():
                f = f.to(dtype)
            return f.to(self.device if device is None else device)
        finally:
            self.recording = was

    def to_cuda(self, module: torch.nn.Module, dtype: torch.dtype | None = None):
        """Every parameter and buffer of ``module`` replaced by a fake CUDA tensor (floating
        ones in ``dtype``): ``module.to("cuda")`` itself fails inside the mode (it swaps the
        tensors' data, which a fake tensor cannot take from a real one)."""
        if dtype is not None:
            self.compute_dtype = dtype
        for mod in module.modules():
            for n, p in list(mod.named_parameters(recurse=False)):
                new = torch.nn.Parameter(self.fake(p, dtype=dtype).detach(), p.requires_grad)
                setattr(mod, n, new)
            for n, b in list(mod.named_buffers(recurse=False)):
                if b is not None:
                    mod._buffers[n] = self.fake(b, dtype=dtype)
        return module

    @staticmethod
    def host():
        """A context in which tensors are real again: host work on real data (decoding an
        uploaded image: torchvision's decoder has no fake kernel and would read the fake
        tensor's missing bytes)."""
        return unset_fake_temporarily()

    # ------------------------------------------------------------------ host reads
    def _read(self, t: torch.Tensor):
        self.host_reads.append((f"{t.device.type} {str(t.dtype).removeprefix('torch.')}", where()))
        if t.dtype == torch.bool:
            return False
        if t.is_floating_point():
            return 0.0
        return self.int_read

    def reads_at(self, fragment: str) -> int:
        """How many host reads came from a line whose ``path:line`` contains ``fragment``."""
        return sum(fragment in w for _, w in self.host_reads)

    # ------------------------------------------------------------------ recording
    def _observe(self, func, name: str, args, out) -> None:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if name not in _FACTORY_DENY and not func.is_view:  # a view makes no new tensor
            for o in outs:
                if isinstance(o, FakeTensor) and o.device.type == "cpu" and o.numel() > 1:
                    self.cpu_made[where()].add(name)
        if name in _GEMMS and self.compute_dtype in (torch.float16, torch.bfloat16):
            ts = [a for a in args if isinstance(a, torch.Tensor)]
            if ts and ts[0].device.type == "cuda" and ts[0].dtype == torch.float32:
                self.fp32_gemms[where()].add(name)

    # ------------------------------------------------------------------ CUDA graphs
    @contextlib.contextmanager
    def cuda_graphs(self):
        """Stand-ins for ``torch.cuda.Stream``/``stream``/``current_stream``/``CUDAGraph``/
        ``graph`` (the real ones need the driver). A capture runs the captured code once
        under the mode and records, in ``self.captures``, the host reads and CPU tensors it
        made: both are errors inside a real capture (a synchronisation while capturing, a
        host copy that a replay would not repeat). ``replay()`` does nothing."""
        gpu = self

        class Stream:
            def __init__(self, device=None, **kw):
                self.device = device

            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def replay(self):
                gpu.replays += 1

        @contextlib.contextmanager
        def graph(g, **kw):
            reads, made = len(gpu.host_reads), {k: set(v) for k, v in gpu.cpu_made.items()}
            yield
            new = {k: v - made.get(k, set()) for k, v in gpu.cpu_made.items()}
            gpu.captures.append(
                {
                    "host_reads": gpu.host_reads[reads:],
                    "cpu_made": {k: v for k, v in new.items() if v},
                }
            )

        @contextlib.contextmanager
        def stream(s):
            yield

        with contextlib.ExitStack() as st:
            for name, obj in (
                ("Stream", Stream),
                ("CUDAGraph", CUDAGraph),
                ("graph", graph),
                ("stream", stream),
                ("current_stream", lambda device=None: Stream(device)),
            ):
                st.enter_context(mock.patch.object(torch.cuda, name, obj))
            yield

    # ------------------------------------------------------------------ backward
    def backward(self, root: torch.Tensor, grad: torch.Tensor | None = None) -> dict:
        """The gradients of ``root`` with respect to every leaf that requires one:
        ``{leaf: gradient}`` (see the module docstring: the autograd graph walked without the
        engine, with the engine's checks between nodes)."""
        if root.grad_fn is None:
            raise RuntimeError("backward: the root has no grad_fn (nothing requires grad)")
        if grad is None:
            grad = torch.ones_like(root)
        order, seen, stack = [], set(), [(root.grad_fn, False)]
        while stack:  # reverse post-order of a depth-first walk: every consumer first
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if node in seen:
                continue
            seen.add(node)
            stack.append((node, True))
            stack.extend((n, False) for n, _ in node.next_functions if n is not None)
        order.reverse()
        pending: dict = defaultdict(dict)  # node -> {input slot: gradient}
        pending[root.grad_fn][0] = grad
        leaves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for node in order:
            slots = pending.pop(node, None)
            if not slots:
                continue
            if hasattr(node, "variable"):  # AccumulateGrad: a leaf
                v, g = node.variable, slots[0]
                prev = leaves.get(id(v))
                leaves[id(v)] = (v, g if prev is None else prev[1] + g)
                continue
            args = [slots.get(i) for i in range(len(node._input_metadata))]
            call = node.apply if hasattr(node, "_forward_cls") else node
            _node_name[0] = f"backward of {_forward_site(node)}"
            try:
                out = call(*args)
            finally:
                _node_name[0] = None
            out = out if isinstance(out, tuple) else (out,)
            for (nxt, slot), g in zip(node.next_functions, out):
                if nxt is None or g is None:
                    continue
                meta = nxt._input_metadata[slot]
                if g.device != meta.device:
                    raise RuntimeError(
                        f"backward: {node.name()} returned a gradient on {g.device} for an "
                        f"input on {meta.device}"
                    )
                if list(g.shape) != list(meta.shape):
                    g = g.sum_to_size(meta.shape)
                if g.dtype != meta.dtype:
                    g = g.to(meta.dtype)
                acc = pending[nxt]
                acc[slot] = g if slot not in acc else acc[slot] + g
        return dict(leaves.values())


def fake_devices(obj) -> set[str]:
    """The devices of every tensor in a nested dict/list/tuple/dataclass ``obj``."""
    found: set[str] = set()

    def walk(o):
        if isinstance(o, torch.Tensor):
            found.add(str(o.device))
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif hasattr(o, "__dataclass_fields__"):
            for k in o.__dataclass_fields__:
                walk(getattr(o, k))

    walk(obj)
    return found


__all__ = ["FakeGPU", "fake_devices", "where"]

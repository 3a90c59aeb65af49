"""What a captioner costs, measured by running it on the meta device: no memory, no data, no
values. Used by :mod:`fastcap.plan` (``fastcap-train --plan``).

* :func:`saved_activation_bytes`: the bytes one training forward saves for backward, counted
  by ``saved_tensors_hooks`` (each storage once, parameters and buffers left out), with the
  inputs that activation checkpointing keeps added by a pre-hook;
* :class:`MetaValues`: a dispatch mode that runs the value-dependent steps (boolean-mask
  gathers, ``nonzero``/``bincount``, ``.item()``) on small CPU stand-ins, routes MoE tokens
  round-robin and keeps channels-last convolution outputs channels-last, as the CPU does;
* :func:`fused_sdpa_on_meta`: attention through PyTorch's fused kernel, which saves what the
  Triton kernel saves;
* :func:`counted_forward_flops`: the forward under ``FlopCounterMode``, the analytic count's
  cross-check.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fastcap.model import Captioner, ModelConfig
from fastcap.model.decoder import DecoderLayer
from fastcap.model.layers import EncoderLayer


def build_meta(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Captioner:
    """The captioner on the meta device: shapes and dtypes, no memory, no initialisation cost.
    ``trunk_weights`` is not read (a meta model holds no values)."""
    cfg = dataclasses.replace(cfg, trunk_weights=None)
    with torch.device("meta"):
        model = Captioner(cfg)
    return model.to(dtype)


# ----------------------------------------------------------------------------- meta values

_VALUE = "_fastcap_plan_value"
_META = torch.device("meta")
_SMALL = 1 << 24  # shadow values are kept for tensors up to this many elements
_aten = torch.ops.aten


def _value(t: Tensor) -> Tensor | None:
    """The CPU value standing in for a meta tensor (a CPU tensor is its own)."""
    return t.__dict__.get(_VALUE) if t.is_meta else t


def _channels_last(ts: list[Tensor]) -> bool:
    return any(
        t.dim() == 4
        and t.is_contiguous(memory_format=torch.channels_last)
        and not t.is_contiguous()
        for t in ts
    )


def _aliases(func) -> bool:
    """The op returns a view or an input (its output's layout is not its own to choose)."""
    return any(r.alias_info is not None for r in func._schema.returns)


def _keep_channels_last(t):
    if isinstance(t, Tensor) and t.is_meta and t.dim() == 4 and t.is_contiguous():
        return t.contiguous(memory_format=torch.channels_last)
    return t


class MetaValues(TorchDispatchMode):
    """Lets the training forward run on the meta device, where a value-dependent shape (a
    boolean-mask gather, ``nonzero``, ``bincount``, ``.item()``) would otherwise stop it.

    Meta tensors computed only from known values (tokens, lengths, masks, positions, routing
    ids) carry their CPU value along (computed on the CPU, at caption sizes). An op that meta
    cannot run is run on the CPU from those values (zeros for a float meta input, whose
    values never decide a shape here) and its result moved to meta. Integer outputs of float
    inputs get a stand-in value: the MoE router's top-k ids route the tokens round-robin
    (``(t * k + c) % E``: every expert gets the same number of rows, the balanced routing the
    aux loss aims at), any other (an argmax prediction) is 0.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        to_meta = kwargs.get("device") == _META
        if not to_meta and not any(t.is_meta for t in tensors):
            return func(*args, **kwargs)
        values = [_value(t) for t in tensors]
        known = all(v is not None for v in values)
        if func is _aten._local_scalar_dense.default:
            if not known:
                raise RuntimeError("fastcap.plan: the value of a meta tensor was needed")
            return values[0].item()
        try:
            out, failed = func(*args, **kwargs), False
        except (NotImplementedError, RuntimeError):
            out, failed = None, True
        if not failed and _channels_last(tensors[:1]) and not _aliases(func):
            # meta's convolution and norms return NCHW-contiguous results for channels-last
            # inputs, where CPU and CUDA kernels keep channels-last; a later reshape would then
            # copy on meta only
            out = pytree.tree_map(_keep_channels_last, out)
        if known or failed:

            def on_cpu(a):
                if isinstance(a, Tensor):
                    v = _value(a)
                    return v if v is not None else torch.zeros(a.shape, dtype=a.dtype)
                return torch.device("cpu") if isinstance(a, torch.device) and a == _META else a

            cargs, ckwargs = pytree.tree_map(on_cpu, (args, kwargs))
            cout = func(*cargs, **ckwargs)
            if failed:
                schema = func._schema
                if schema.name.endswith("_") or any(a.is_out for a in schema.arguments):
                    out = args[0]  # in place: the meta tensor itself; its value was updated
                else:
                    out = pytree.tree_map(
                        lambda t: t.to(_META) if isinstance(t, Tensor) else t, cout
                    )
            for m, c in zip(pytree.tree_leaves(out), pytree.tree_leaves(cout)):
                small = isinstance(m, Tensor) and m.is_meta and m.numel() <= _SMALL
                if small and (known or not m.is_floating_point()):
                    m.__dict__[_VALUE] = c
            return out
        for i, m in enumerate(pytree.tree_leaves(out)):
            if isinstance(m, Tensor) and m.is_meta and not m.is_floating_point():
                if m.numel() > _SMALL:
                    continue
                if func is _aten.topk.default and i == 1:  # the router's ids: round-robin
                    E = args[0].shape[-1]
                    v = (torch.arange(m.numel()) % E).view(m.shape)
                else:
                    v = torch.zeros(m.shape, dtype=m.dtype)
                m.__dict__[_VALUE] = v
        return out


# ----------------------------------------------------------------------------- activations


def example_batch(
    cfg: ModelConfig, batch: int, caption_len: int, device, dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Images (zeros), tokens and lengths of ``batch`` captions of ``caption_len`` positions
    each (every row full: the longest caption a batch pads to)."""
    g = torch.Generator().manual_seed(0)
    S = cfg.image_size
    images = torch.zeros(batch, 3, S, S, dtype=dtype)
    tokens = torch.randint(3, cfg.vocab_size, (batch, caption_len), generator=g)
    tokens[:, 0], tokens[:, -1] = cfg.bos_id, cfg.eos_id
    lens = torch.full((batch,), caption_len)
    return images.to(device), tokens.to(device), lens.to(device)


def saved_activation_bytes(
    model: Captioner,
    images: Tensor,
    tokens: Tensor,
    lens: Tensor,
    *,
    tf_p: float = 1.0,
) -> int:
    """Bytes autograd keeps for the backward of one training forward (``model(images, tokens,
    lens, tf_p)``, the call ``fastcap.train.step`` makes), counted once per storage.

    Every tensor saved for backward is caught with ``torch.autograd.graph.saved_tensors_hooks``
    and its storage counted once; parameters and buffers are left out (they are not
    activations). Layers wrapped by ``fastcap.train.parallelize`` (activation checkpointing,
    non-reentrant) save nothing inside; they keep their inputs for the recomputation, which a
    forward pre-hook on each wrapped layer adds. The same function measures a CPU model (the
    tests compare the two).
    """
    held = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}
    keep: list[Tensor] = []  # holding every counted tensor: no storage address is reused

    def count(t: Tensor) -> None:
        if isinstance(t, Tensor):
            s = t.untyped_storage()
            if s._cdata not in held and s._cdata not in seen:
                seen[s._cdata] = s.nbytes()
                keep.append(t)

    def pack(t: Tensor) -> Tensor:
        count(t)
        return t

    def pre_hook(module, args, kwargs):
        if torch.is_grad_enabled():
            for t in pytree.tree_leaves((args, kwargs)):
                count(t)

    hooks = [
        m.register_forward_pre_hook(pre_hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, (EncoderLayer, DecoderLayer)) and getattr(m, "_fastcap_ckpt", False)
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()
            out = model(images, tokens, lens, tf_p=tf_p)
        del out
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values())


@contextlib.contextmanager
def fused_sdpa_on_meta():
    """While open, ``F.scaled_dot_product_attention`` on meta tensors runs PyTorch's fused CPU
    kernel (``_scaled_dot_product_flash_attention_for_cpu``, a boolean mask turned into an
    additive one as the CPU does), not the unfused math that meta would pick: the CPU's SDPA
    takes that kernel, and it saves for backward what the Triton kernel does (q, k, v, out and
    a per-row fp32 log-sum-exp), where the unfused form would save the probabilities."""
    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if not q.is_meta or dropout_p or kw.get("enable_gqa"):
            return orig(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kw)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            additive = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
            attn_mask = additive.masked_fill(~attn_mask, float("-inf"))
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale
        )
        return out

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


def measure_activations(
    cfg: ModelConfig,
    batch: int,
    caption_len: int,
    dtype: torch.dtype,
    tf_p: float = 1.0,
) -> tuple[int, int]:
    """Saved activation bytes of one training forward on the meta device, (without, with)
    activation checkpointing."""
    from fastcap.train.parallelize import apply_activation_checkpointing

    model = build_meta(cfg, dtype)
    result = []
    with MetaValues(), fused_sdpa_on_meta():
        inputs = example_batch(cfg, batch, caption_len, _META, dtype)
        result.append(saved_activation_bytes(model, *inputs, tf_p=tf_p))
        apply_activation_checkpointing(model)
        result.append(saved_activation_bytes(model, *inputs, tf_p=tf_p))
    return result[0], result[1]


def counted_trunk(cfg: ModelConfig) -> tuple[float, int]:
    """(forward FLOPs per image, output channels) of the vision trunk as ``FlopCounterMode``
    counts them on the meta device: for trunks :mod:`fastcap.flops` has no formula for."""
    from torch.utils.flop_counter import FlopCounterMode

    trunk = build_meta(cfg, torch.float32).vision.trunk
    x = torch.empty(1, 3, cfg.image_size, cfg.image_size, device=_META)
    counter = FlopCounterMode(display=False)
    with counter, MetaValues():
        out = trunk(x)
    return float(counter.get_total_flops()), int(out.shape[1])


def counted_forward_flops(cfg: ModelConfig, caption_len: int, batch: int = 2) -> float:
    """Forward FLOPs per image as ``FlopCounterMode`` counts them, on the meta device, with the
    reference ops (what ``auto`` picks for non-CUDA tensors) and balanced routing."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_meta(cfg, torch.float32)
    counter = FlopCounterMode(display=False)
    with counter, MetaValues():
        model(*example_batch(cfg, batch, caption_len, _META, torch.float32))
    return counter.get_total_flops() / batch

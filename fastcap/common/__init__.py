"""What the Triton kernels (:mod:`fastcap.kernels`) and the PyTorch references
(:mod:`fastcap.ops.ref`) share. A leaf package: it imports neither of them, nor
:mod:`fastcap.ops` or :mod:`fastcap.model`, so both sides can import it.

* :mod:`~fastcap.common.rope`: the RoPE cos/sin tables.
* :mod:`~fastcap.common.moe_align`: sort routed pairs by expert into blocks (PyTorch and the
  compiled ``fastcap_C`` extension).
"""

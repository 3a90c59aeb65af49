"""Triton kernels for fastcap, installed as ``fastcap.kernels``. One op per file."""

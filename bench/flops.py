"""The analytic FLOP counts and device peaks, re-exported from :mod:`fastcap.flops` (the package
owns them: ``fastcap-train --plan`` uses them and the package never imports ``bench/``).

Kept as a module of its own so that the benchmarks and ``bench/gpu_check`` keep writing
``from flops import ...``. ``fastcap.flops`` imports only the standard library and ``import
fastcap`` imports nothing, so this works from a plain checkout on a bare GPU machine too: when
fastcap is not installed, the checkout's root (this file's parent's parent) goes on ``sys.path``.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import fastcap.flops  # noqa: F401
except ImportError:  # a plain checkout without ``pip install``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcap.flops import (  # noqa: E402
    BF16_PEAK_TFLOPS,
    attention_flops,
    bf16_peak_tflops,
    matmul_flops,
    model_flops_per_image,
    moe_flops,
    siglip_flops,
)

__all__ = [
    "BF16_PEAK_TFLOPS",
    "attention_flops",
    "bf16_peak_tflops",
    "matmul_flops",
    "model_flops_per_image",
    "moe_flops",
    "siglip_flops",
]

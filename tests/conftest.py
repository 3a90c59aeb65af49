"""Test-wide set-up. Without a GPU, Triton kernels run in the interpreter and DeepSpeed on the
CPU; both flags must be set before triton/deepspeed are imported, hence here, at the top."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("FASTCAP_KERNELS", "auto")

"""Vision encoder: a trunk (torchvision ResNet or timm backbone, :mod:`fastcap.model.trunks`)
with its own input normalisation, 1x1 projection, ViT-style tokens with a learned 2-D position
embedding, pre-norm Transformer encoder layers, a pooled embedding.

The encoder takes what the data path has: uint8 images, normalised here with the trunk's own
mean/std, so training, evaluation, bundles, ``fastcap.load`` and ``fastcap-serve`` cannot
disagree on it; or the trunk's output map itself, computed once for a frozen trunk
(:mod:`fastcap.data.features`)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from fastcap.model.config import ModelConfig
from fastcap.model.layers import EncoderLayer, RMSNorm
from fastcap.model.trunks import build_trunk, is_timm, output_grid

CHANNELS_LAST = True
"""Feed the trunk channels-last images: its convolutions then run NHWC, faster than NCHW on
the CPU (bench/bench_step.py::test_trunk_choices, bench/RESULTS.md) and what cuDNN's tensor-core
kernels want on a GPU."""


class VisionEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        trunk = build_trunk(
            cfg.trunk, cfg.trunk_stride, cfg.trunk_weights, cfg.trunk_norm, cfg.trunk_head
        )
        self.trunk, channels = trunk.module, trunk.channels
        self.channels = channels
        # the trunk's input statistics: buffers (they follow .to(device)) but not saved, so the
        # state dict is the weights alone and a bundle rebuilds them from model.trunk
        self.register_buffer("pixel_mean", torch.tensor(trunk.mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(trunk.std).view(1, 3, 1, 1), False)
        if cfg.freeze_trunk:  # never trained: out of the optimiser, no gradient kept
            self.trunk.requires_grad_(False)
        self.proj = nn.Conv2d(channels, cfg.width, kernel_size=1)
        p = cfg.patch
        self.patch = nn.Linear(p * p * cfg.width, cfg.width) if p > 1 else None
        if is_timm(cfg.trunk):  # TF-"same" padding rounds up: measured, not divided
            h, w = output_grid(self.trunk, cfg.image_size)
            if h != w or h % p:
                raise ValueError(
                    f"{cfg.trunk} at {cfg.image_size} px gives a {h} x {w} map: it must be "
                    f"square and divisible by patch {p}"
                )
            grid = h // p
        else:
            grid = cfg.image_size // cfg.trunk_stride // p
        self.grid = grid
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.pos_row = nn.Parameter(torch.randn(grid, 1, cfg.width) * 0.02)
        self.pos_col = nn.Parameter(torch.randn(1, grid, cfg.width) * 0.02)
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.width, cfg.heads, cfg.ffn_hidden) for _ in range(cfg.encoder_layers)
        )
        self.norm = RMSNorm(cfg.width)
        self.embed = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self._trunk_frozen = False

    @property
    def trunk_frozen(self) -> bool:
        """The trunk is frozen for this step (the trainer sets it from the step number, see
        ``ModelConfig.freeze_trunk_steps``): it runs under ``no_grad`` in eval mode, so its
        parameters get no gradient and its BatchNorm statistics do not move."""
        return self._trunk_frozen or self.cfg.freeze_trunk

    @trunk_frozen.setter
    def trunk_frozen(self, frozen: bool) -> None:
        self._trunk_frozen = bool(frozen)
        self.train(self.training)  # re-apply the trunk's mode

    def train(self, mode: bool = True) -> VisionEncoder:
        """``nn.Module.train``, except that the trunk's BatchNorm layers stay in eval mode (their
        running statistics fixed) with ``trunk_bn_frozen``, and the whole trunk while
        :attr:`trunk_frozen`. ``engine.train()`` (DeepSpeed) reaches this through the parent."""
        super().train(mode)
        if mode and self.trunk_frozen:
            self.trunk.eval()
        elif mode and self.cfg.trunk_bn_frozen:
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def normalize(self, u8: Tensor) -> Tensor:
        """uint8 (B, 3, S, S) -> float (B, 3, S, S) in the parameters' dtype, with the trunk's
        mean/std, channels-last memory when :data:`CHANNELS_LAST`."""
        dtype = self.proj.weight.dtype
        x = (u8.to(dtype) / 255.0 - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if CHANNELS_LAST else x

    def trunk_features(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, S, S) (or float images already normalised) -> the trunk's map
        (B, C, g, g); without grad while :attr:`trunk_frozen`."""
        x = self.normalize(images) if images.dtype == torch.uint8 else images
        if CHANNELS_LAST:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.trunk_frozen:  # no activations kept, no backward through the trunk
            with torch.no_grad():
                return self.trunk(x)
        return self.trunk(x)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images -> tokens (B, N, d), pooled embedding (B, embed_dim). ``images`` is one of:

        * uint8 (B, 3, S, S): pixels, normalised here with the trunk's mean/std;
        * float (B, 3, S, S): pixels already normalised that way (tests, benchmarks);
        * float (B, C, g, g), C = :attr:`channels` (never 3): the trunk's own output for these
          images, computed earlier (the feature cache of a frozen trunk); the trunk is skipped.
        """
        dtype = self.proj.weight.dtype
        if images.shape[1] == 3:
            t = self.trunk_features(images.to(dtype) if images.is_floating_point() else images)
        elif images.shape[1] == self.channels and images.is_floating_point():
            t = images.to(dtype)  # cached fp16 features -> the model's dtype
        else:
            raise ValueError(
                f"vision encoder: expected images (B, 3, S, S) or trunk features (B, "
                f"{self.channels}, g, g), got {tuple(images.shape)} {images.dtype}"
            )
        f = self.drop(self.proj(t))  # (B, d, g, g): dropped after the projection, 5x cheaper
        B, d, g, _ = f.shape
        p = self.cfg.patch
        if self.patch is not None:
            # (B, d, g/p, p, g/p, p) -> (B, g/p, g/p, p*p*d): one token per p x p cell block
            f = f.view(B, d, g // p, p, g // p, p).permute(0, 2, 4, 3, 5, 1)
            x = self.patch(f.reshape(B, g // p, g // p, p * p * d))
        else:
            x = f.permute(0, 2, 3, 1)  # (B, g, g, d)
        x = (x + self.pos_row + self.pos_col).reshape(B, -1, d)  # (B, N, d)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return x, self.embed(x.mean(dim=1))

"""Vision encoder: ResNet trunk cut at a stride, 1x1 projection, ViT-style tokens with a learned
2-D position embedding, pre-norm Transformer encoder layers, a pooled embedding."""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision
from torch import Tensor

from fastcap.model.config import ModelConfig
from fastcap.model.layers import EncoderLayer, RMSNorm
from fastcap.model.trunk_weights import TrunkWeightsError, load_trunk_state, load_trunk_weights

# ResNet stage -> (output stride, channels for resnet18/34, channels for resnet50)
_STAGES = {
    "layer1": (4, 64, 256),
    "layer2": (8, 128, 512),
    "layer3": (16, 256, 1024),
    "layer4": (32, 512, 2048),
}


def build_trunk(
    name: str, stride: int, weights: str | None, norm: str = "batch"
) -> tuple[nn.Module, int]:
    """A torchvision ResNet cut at ``stride``: built with weights=None, then optionally loaded
    (strictly, see :func:`load_trunk_weights`) from the weights ``model.trunk_weights`` names
    (:func:`load_trunk_state`); built on the meta device (shapes only), nothing is read."""
    kw = {"norm_layer": lambda c: nn.GroupNorm(32, c)} if norm == "group" else {}
    net = getattr(torchvision.models, name)(weights=None, **kw)
    if weights is not None and not net.conv1.weight.is_meta:  # a meta model holds no values
        if norm != "batch":
            raise TrunkWeightsError(
                "model.trunk_weights needs model.trunk_norm=batch (pretrained ResNets use "
                "BatchNorm)"
            )
        load_trunk_weights(net, load_trunk_state(name, weights), weights)
    layers = [net.conv1, net.bn1, net.relu, net.maxpool]
    channels = 0
    for stage, (s, c_small, c_big) in _STAGES.items():
        layers.append(getattr(net, stage))
        channels = c_big if name == "resnet50" else c_small
        if s == stride:
            break
    return nn.Sequential(*layers), channels


CHANNELS_LAST = True
"""Feed the trunk channels-last images: its convolutions then run NHWC, faster than NCHW on
the CPU (bench/bench_step.py::test_trunk_choices, bench/RESULTS.md) and what cuDNN's tensor-core
kernels want on a GPU."""


class VisionEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk, channels = build_trunk(
            cfg.trunk, cfg.trunk_stride, cfg.trunk_weights, cfg.trunk_norm
        )
        self.proj = nn.Conv2d(channels, cfg.width, kernel_size=1)
        p = cfg.patch
        self.patch = nn.Linear(p * p * cfg.width, cfg.width) if p > 1 else None
        grid = cfg.image_size // cfg.trunk_stride // p
        self.grid = grid
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
        return self._trunk_frozen

    @trunk_frozen.setter
    def trunk_frozen(self, frozen: bool) -> None:
        self._trunk_frozen = bool(frozen)
        self.train(self.training)  # re-apply the trunk's mode

    def train(self, mode: bool = True) -> VisionEncoder:
        """``nn.Module.train``, except that the trunk's BatchNorm layers stay in eval mode (their
        running statistics fixed) with ``trunk_bn_frozen``, and the whole trunk while
        :attr:`trunk_frozen`. ``engine.train()`` (DeepSpeed) reaches this through the parent."""
        super().train(mode)
        if mode and self._trunk_frozen:
            self.trunk.eval()
        elif mode and self.cfg.trunk_bn_frozen:
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, S, S) normalised -> tokens (B, N, d), pooled embedding (B, embed_dim)."""
        if CHANNELS_LAST:
            images = images.contiguous(memory_format=torch.channels_last)
        if self._trunk_frozen:  # no activations kept, no backward through the trunk
            with torch.no_grad():
                t = self.trunk(images)
        else:
            t = self.trunk(images)
        f = self.proj(t)  # (B, d, g, g)
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

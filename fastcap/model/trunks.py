"""Vision trunks: a torchvision ResNet cut at a stride, or any timm backbone at a chosen stage,
each with the input normalisation its weights were trained with.

``model.trunk`` names one:

* ``resnet18`` / ``resnet34`` / ``resnet50``: torchvision's ResNets (optionally GroupNorm),
  cut after the stage of ``model.trunk_stride``; ImageNet mean/std.
* ``timm:NAME`` (``timm:tf_efficientnet_lite0``, ``timm:resnet50``, ``timm:convnext_tiny``...):
  timm's model of that name, its stage of reduction ``model.trunk_stride`` taken from its
  ``feature_info`` (the stage table timm's ``features_only`` extractors read), run through
  ``forward_intermediates`` with the later stages and the classifier pruned away; or, with
  ``model.trunk_head``, the backbone's own last map (``forward_features``: EfficientNet's
  1280-channel conv head). Mean/std from the model's ``pretrained_cfg`` (0.5/0.5 for the
  EfficientNet-Lite weights).

Why not ``timm.create_model(..., features_only=True)`` itself: its wrappers rename modules
(``stages.3`` -> ``stages_3``) and its EfficientNet extractor loads pretrained weights
non-strictly; the full model keeps the names of the weights file, so one strict load (every
key reported, :func:`fastcap.model.trunk_weights.load_trunk_weights`) happens before the
pruning, and the pruned model's output is the same map (checked in tests/test_trunk.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torchvision
from torch import Tensor

from fastcap.model.trunk_weights import (
    TrunkWeightsError,
    load_timm_state,
    load_trunk_state,
    load_trunk_weights,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESNETS = ("resnet18", "resnet34", "resnet50")

# ResNet stage -> (output stride, channels for resnet18/34, channels for resnet50)
_STAGES = {
    "layer1": (4, 64, 256),
    "layer2": (8, 128, 512),
    "layer3": (16, 256, 1024),
    "layer4": (32, 512, 2048),
}


@dataclass(frozen=True)
class Trunk:
    """A built trunk: the module (normalised float images (B, 3, S, S) -> (B, C, h, w)), its
    channels C, and the mean/std (RGB, on [0, 1] pixels) its weights expect."""

    module: nn.Module
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def is_timm(name: str) -> bool:
    return name.startswith("timm:")


def timm_name(name: str) -> str:
    return name.removeprefix("timm:")


def _import_timm():
    try:
        import timm
    except ImportError:
        raise TrunkWeightsError(
            "model.trunk timm:...: timm is not installed; pip install timm (or make install)"
        ) from None
    return timm


def build_resnet(
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
        load_trunk_weights(net, load_trunk_state(name, weights), weights, drop=("fc.",))
    layers = [net.conv1, net.bn1, net.relu, net.maxpool]
    channels = 0
    for stage, (s, c_small, c_big) in _STAGES.items():
        layers.append(getattr(net, stage))
        channels = c_big if name == "resnet50" else c_small
        if s == stride:
            break
    return nn.Sequential(*layers), channels


class TimmStage(nn.Module):
    """A timm backbone's output at one ``feature_info`` stage (``index``), the layers after it
    pruned; or, with ``head``, its ``forward_features`` map (the classifier dropped)."""

    def __init__(self, net: nn.Module, index: int | None):
        super().__init__()
        self.index = index
        if index is None:
            net.reset_classifier(0)  # forward_features never reads it
        else:
            net.prune_intermediate_layers(indices=[index], prune_norm=False, prune_head=True)
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        if self.index is None:
            return self.net.forward_features(x)  # (B, C, h, w)
        return self.net.forward_intermediates(x, indices=[self.index], intermediates_only=True)[0]


def build_timm(name: str, stride: int, weights: str | None, head: bool) -> Trunk:
    """``timm:NAME`` at the stage of reduction ``stride`` (or its ``forward_features`` map with
    ``head``), weights loaded strictly into the whole model before the pruning."""
    timm = _import_timm()
    arch = timm_name(name)
    try:
        net = timm.create_model(arch, pretrained=False)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise TrunkWeightsError(f"model.trunk {name}: {str(e).splitlines()[0]}") from None
    info = net.feature_info
    reductions = [int(f["reduction"]) for f in info]
    if head:
        if stride != reductions[-1]:
            raise TrunkWeightsError(
                f"model.trunk_head: {name}'s own last map is at stride {reductions[-1]}; set "
                f"model.trunk_stride={reductions[-1]}"
            )
        index, channels = None, int(net.num_features)
    else:
        if stride not in reductions:
            raise TrunkWeightsError(
                f"model.trunk {name} has no stage at stride {stride}: its stages reduce by "
                f"{reductions} (model.trunk_stride)"
            )
        index = reductions.index(stride)
        channels = int(info[index]["num_chs"])
    first = next(net.parameters())
    if weights is not None and not first.is_meta:
        head_names = net.pretrained_cfg.get("classifier") or ()  # str or tuple of names
        if isinstance(head_names, str):
            head_names = (head_names,)
        drop = tuple(f"{c}." for c in head_names)
        load_trunk_weights(net, load_timm_state(net, arch, weights), weights, drop=drop)
    cfg = net.pretrained_cfg
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    return Trunk(TimmStage(net, index), channels, mean, std)  # type: ignore[arg-type]


def build_trunk(
    name: str, stride: int, weights: str | None, norm: str = "batch", head: bool = False
) -> Trunk:
    """The trunk ``model.trunk`` names (see the module docstring)."""
    if is_timm(name):
        return build_timm(name, stride, weights, head)
    module, channels = build_resnet(name, stride, weights, norm)
    return Trunk(module, channels, IMAGENET_MEAN, IMAGENET_STD)


@torch.no_grad()
def output_grid(trunk: nn.Module, image_size: int) -> tuple[int, int]:
    """(h, w) of the trunk's map for a square ``image_size`` input: TF-"same"-padded
    backbones round up (260 px / 32 -> 9), so it is measured, not divided. On the meta device
    this costs nothing."""
    p = next(trunk.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    was = trunk.training
    trunk.eval()
    try:
        h, w = trunk(x).shape[-2:]
    finally:
        trunk.train(was)
    return int(h), int(w)

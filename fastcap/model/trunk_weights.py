"""Pretrained trunk weights: what ``model.trunk_weights`` names (torchvision's weights API or a
local state dict), where the offline cache lives, and the strict load. A leaf of
:mod:`fastcap.model`: the config's validation and the vision encoder both read it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torchvision
from torch import Tensor


class TrunkWeightsError(ValueError):
    """Trunk weights that cannot be found, fetched or loaded; the one-line message says how to
    fix it."""


def named_trunk_weights(name: str, weights: str):
    """The torchvision ``*_Weights`` member that ``weights`` names for trunk ``name``
    (``imagenet``/``DEFAULT``: the trunk's default ImageNet weights; else a member name such as
    ``IMAGENET1K_V2``, any case), or None when ``weights`` names no member (a file path)."""
    enum = torchvision.models.get_model_weights(name)
    key = weights.strip().upper()
    if key in ("IMAGENET", "DEFAULT"):
        return enum.DEFAULT
    return enum.__members__.get(key)


def weight_names(name: str) -> list[str]:
    """The values of ``model.trunk_weights`` that name torchvision weights for trunk ``name``."""
    return ["imagenet", *(w.name for w in torchvision.models.get_model_weights(name))]


def hub_cache_file(weights) -> Path:
    """Where torchvision's weights API reads (and, online, downloads) ``weights``: torch.hub's
    cache, ``$TORCH_HOME/hub/checkpoints/<file name of the weights URL>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def load_trunk_state(name: str, weights: str, progress: bool = False) -> dict[str, Tensor]:
    """The state dict that ``model.trunk_weights`` names: torchvision weights through their
    API (downloaded once when online, read from torch.hub's cache when offline) or a local
    ``torch.save``-d state dict (or a checkpoint dict holding one under ``state_dict`` or
    ``model``)."""
    member = named_trunk_weights(name, weights)
    if member is not None:
        cached = hub_cache_file(member)
        try:
            state = member.get_state_dict(progress=progress, check_hash=True, weights_only=True)
        except Exception as e:  # offline (URLError), refused, truncated, corrupt download
            raise TrunkWeightsError(
                f"trunk weights {weights} ({name} {member.name}) could not be read or downloaded "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); offline, put "
                f"{member.url} at {cached} (torch.hub's cache, under $TORCH_HOME), or set "
                f"model.trunk_weights to the path of a local state_dict file"
            ) from None
    else:
        if not Path(weights).is_file():
            raise TrunkWeightsError(
                f"model.trunk_weights {weights!r}: no such file, and not a weights name for "
                f"{name} (use one of {', '.join(weight_names(name))} or a state_dict path)"
            )
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TrunkWeightsError(
                f"trunk weights {weights}: not a torch.save-d state dict ({type(e).__name__})"
            ) from None
    if isinstance(state, dict):
        for k in ("state_dict", "model"):  # a checkpoint dict that holds the state dict
            if isinstance(state.get(k), dict) and not any(
                torch.is_tensor(v) for v in state.values()
            ):
                state = state[k]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise TrunkWeightsError(f"trunk weights {weights}: not a state dict of tensors")
    return state


def load_trunk_weights(net: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into the whole torchvision ResNet ``net``, strictly: every key but the
    ``fc.`` classifier (which is dropped) must be present, with its shape, and nothing else."""
    own = net.state_dict()
    for k, v in state.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise TrunkWeightsError(
                f"trunk weights {source}: {k} has shape {tuple(v.shape)}, the trunk "
                f"{tuple(own[k].shape)}; use weights of the same ResNet (model.trunk)"
            )
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    unexpected = [k for k in unexpected if not k.startswith("fc.")]
    if missing or unexpected:
        raise TrunkWeightsError(
            f"trunk weights {source}: {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:4]}; use a state_dict of the "
            f"torchvision ResNet named by model.trunk with model.trunk_norm=batch"
        )

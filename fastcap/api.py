"""fastcap as a library: ``fastcap.load(path)`` -> :class:`ImageCaptioner`, whose
:meth:`~ImageCaptioner.caption` takes images in any common form and returns :class:`Caption`\\ s.

    import fastcap
    cap = fastcap.load("runs/shapes-tiny")          # a run folder or a bundle
    cap.caption("photo.jpg").text                   # one image -> one Caption
    [c.text for c in cap.caption(["a.png", pil_image, array], strategy="beam")]

Images are decoded and resized exactly as fastcap-caption does (torchvision's decoder, the
shorter side to the model's size, a centre crop), so a path gives the CLI's caption. Decoding
is batched with :attr:`ImageCaptioner.batch_size` images a batch (beam search: that many rows,
so batch_size // num_beams images), chosen from the device unless given.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fastcap.common import capability
from fastcap.runs import default_device

CPU_BATCH = 16  # images per decoding batch on a CPU
CUDA_BATCH_PER_GIB = 2  # ... and per GiB of GPU memory, clipped to [16, 256]


def default_dtype(device: torch.device) -> torch.dtype:
    """The capability policy's precision (:func:`fastcap.common.capability.precision_for`):
    bf16 from compute capability 8.0, fp16 on sm_70 / sm_75 (T4), fp32 below and on the CPU
    (the weights are stored in fp32). Logged once with the reason on ``fastcap.api``."""
    return capability.inference_dtype(device)


def default_batch_size(device: torch.device) -> int:
    """Images (rows) per decoding batch: 16 on a CPU; on a GPU 2 per GiB, in [16, 256]."""
    if device.type == "cuda":
        gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        return int(min(256, max(16, CUDA_BATCH_PER_GIB * gib)))
    return CPU_BATCH


_TYPES = {"int": (int,), "float": (int, float), "str": (str,)}


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode; checked when made (ValueError naming the field). Hashable, so that
    requests with equal options can share a batch (:mod:`fastcap.serve.batcher`)."""

    strategy: str = "greedy"
    """greedy, beam or sample."""
    num_beams: int = 3
    """beam: beams per image."""
    length_penalty: float = 0.6
    """beam: alpha of GNMT's ((5 + len) / 6) ** alpha."""
    top_p: float = 0.9
    """sample: nucleus mass in (0, 1]."""
    top_k: int = 0
    """sample: keep the k best tokens (0: all)."""
    temperature: float = 1.0
    """sample: > 0."""
    seed: int | None = None
    """sample: seed of the draws of one call (None: torch's global generator)."""
    max_new_tokens: int | None = None
    """At most this many tokens, eos included (None: the model's max_len - 1)."""
    min_new_tokens: int = 0
    """eos is banned before this many tokens."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on tokens already generated (1 disables)."""
    no_repeat_ngram_size: int = 0
    """Ban repeating any n-gram of this size (0 disables)."""

    def __post_init__(self):
        from fastcap.generate import check_controls

        for f in fields(self):
            v = getattr(self, f.name)
            kind = f.type.split(" ")[0]  # "int", "float", "str" (annotations are strings)
            if v is None and "None" in f.type:
                continue
            if isinstance(v, bool) or not isinstance(v, _TYPES[kind]):
                raise ValueError(f"{f.name} must be {kind}, got {v!r}")
        check_controls(
            strategy=self.strategy,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            num_beams=self.num_beams,
            top_p=self.top_p,
            top_k=self.top_k,
            temperature=float(self.temperature),
            length_penalty=float(self.length_penalty),
            seed=self.seed,
        )

    def generate_kwargs(self) -> dict:
        """The keyword arguments of :func:`fastcap.generate.generate` for this strategy."""
        kw = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if self.strategy == "beam":
            kw.update(num_beams=self.num_beams, length_penalty=self.length_penalty)
        elif self.strategy == "sample":
            kw.update(
                top_p=self.top_p, top_k=self.top_k, temperature=self.temperature, seed=self.seed
            )
        return kw

    def rows_per_image(self) -> int:
        return self.num_beams if self.strategy == "beam" else 1


OPTION_NAMES = tuple(f.name for f in fields(DecodeOptions))


@dataclass
class Caption:
    """One image's caption."""

    text: str
    logprob: float
    """Sum of the log-probabilities of the generated tokens, eos included (with a penalty or
    a temperature set: of the distribution they made)."""
    score: float
    """What the strategy ranked by: beam search's length-penalised logprob; else logprob."""
    tokens: list[int]
    """Generated token ids, eos included, no padding."""
    attention: Image.Image | None = None
    """With ``return_attention``: the picture ``fastcap-caption --attention-maps`` draws."""


@dataclass
class Prepared:
    """One decoded image, ready for a batch."""

    pixels: Tensor
    """(3, S, S) uint8: the model's input before normalisation."""
    display: Tensor | None = None
    """(3, 256, 256) uint8: the background of the attention-map picture, when asked for."""
    seed: int | None = None
    """sample: this image's own seed (:func:`fastcap.generate.derive_seeds` of its request's
    seed and its index there), so its caption does not depend on the batch it is decoded in."""


# ---------------------------------------------------------------------- images in any form
def _decode(data: bytes) -> Tensor:
    """Encoded bytes -> (3, H, W) uint8: the bounded decoder every reader shares
    (:func:`fastcap.data.images.decode_rgb`: the first frame of an animated image, torchvision
    for JPEG/PNG/WebP, PIL for the rest). ValueError (one line) if it cannot."""
    from fastcap.data.images import decode_rgb

    return decode_rgb(data)


def _from_pil(im: Image.Image) -> Tensor:
    return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def _from_array(a: Tensor, channels_last: bool) -> Tensor:
    """(H, W) or (H, W, C) [numpy] / (C, H, W) [torch], C in {1, 3, 4}, uint8 or float in
    [0, 1] -> (3, H, W) uint8 (gray repeated, alpha dropped)."""
    if a.ndim == 2:
        a = a[None] if not channels_last else a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"expected an image of 2 or 3 dims, got shape {tuple(a.shape)}")
    if channels_last:
        a = a.permute(2, 0, 1)
    if a.shape[0] not in (1, 3, 4) or a.shape[1] < 1 or a.shape[2] < 1:
        layout = "(H, W, C)" if channels_last else "(C, H, W)"
        raise ValueError(f"expected {layout} with C = 1, 3 or 4, got shape {tuple(a.shape)}")
    a = a[:3] if a.shape[0] == 4 else a.expand(3, -1, -1) if a.shape[0] == 1 else a
    if a.dtype == torch.uint8:
        return a.contiguous()
    if not a.is_floating_point():
        raise ValueError(f"expected uint8 or floats in [0, 1], got {a.dtype}")
    lo, hi = float(a.min()), float(a.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise ValueError(
            f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
            "(already normalised? give the raw image)"
        )
    return (a.float() * 255).round_().to(torch.uint8).contiguous()


def to_uint8(image) -> Tensor:
    """A path, encoded bytes, a PIL image, a numpy array (H, W[, C]) or a tensor ([C,] H, W)
    -> (3, H, W) uint8 on the CPU. ValueError (one line) for anything else."""
    if isinstance(image, (str, os.PathLike)):
        try:
            data = Path(image).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read the file ({e.strerror or e})") from None
        return _decode(data)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(bytes(image))
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        if image.dtype == np.bool_ or image.dtype.kind not in "uif":
            raise ValueError(f"expected uint8 or floats in [0, 1], got numpy {image.dtype}")
        if image.dtype.kind in "ui" and image.dtype != np.uint8:
            raise ValueError(f"expected uint8 or floats in [0, 1], got numpy {image.dtype}")
        if not (image.flags.writeable and image.flags.c_contiguous):
            image = np.array(image)  # torch.from_numpy wants a writable, contiguous array
        return _from_array(torch.from_numpy(image), channels_last=True)
    if isinstance(image, Tensor):
        return _from_array(image.detach().cpu(), channels_last=False)
    raise ValueError(
        f"unsupported image type {type(image).__name__}; give a path, bytes, a PIL image, "
        "a numpy array (H, W, C) or a tensor (C, H, W)"
    )


def _row_seeds(items: Sequence[Prepared], options: DecodeOptions) -> list[int] | None:
    """Each item's sampling seed, or None (no seed anywhere: torch's global generator)."""
    from fastcap.generate import derive_seeds

    if options.strategy != "sample":
        return None
    own = [p.seed for p in items]
    if all(sd is None for sd in own):
        return None if options.seed is None else derive_seeds(options.seed, len(items))
    return [int(torch.randint(0, 2**62, ())) if sd is None else sd for sd in own]


def _as_list(images) -> tuple[bool, list]:
    """-> (many, items): a list/tuple, a 4-d array or tensor is many images; anything else one."""
    if isinstance(images, (list, tuple)):
        return True, list(images)
    if isinstance(images, (np.ndarray, Tensor)) and images.ndim == 4:
        return True, list(images)
    return False, [images]


# ---------------------------------------------------------------------- the captioner
class ImageCaptioner:
    """A trained captioner ready to caption: the model, its tokenizer, a device and a batch
    size. Made by :func:`load`; not thread-safe (fastcap-serve calls it from one thread)."""

    def __init__(self, model, tokenizer, *, batch_size: int | None = None, source=None):
        self.model = model
        self.tokenizer = tokenizer
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.image_size = model.cfg.image_size
        self.max_new_tokens = model.cfg.max_len - 1
        self.batch_size = batch_size or default_batch_size(self.device)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.source = None if source is None else Path(source)

    def __repr__(self) -> str:
        return (
            f"ImageCaptioner({self.source}, device={self.device}, dtype={self.dtype}, "
            f"batch_size={self.batch_size})"
        )

    def prepare(self, image, attention: bool = False) -> Prepared:
        """One image in any form (see :func:`to_uint8`) -> :class:`Prepared`; ValueError."""
        from fastcap.attention_maps import MAIN
        from fastcap.data.images import _fit as fit  # the CLI's resize + crop: same pixels

        u8 = to_uint8(image)
        return Prepared(fit(u8, self.image_size), fit(u8, MAIN) if attention else None)

    def caption(
        self,
        images,
        *,
        strategy: str = "greedy",
        num_beams: int = 3,
        length_penalty: float = 0.6,
        top_p: float = 0.9,
        top_k: int = 0,
        temperature: float = 1.0,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        return_attention: bool = False,
        batch_size: int | None = None,
    ) -> Caption | list[Caption]:
        """Caption one image (-> :class:`Caption`) or many (a list or tuple, or a 4-d array /
        tensor -> list of Caption, in order).

        An image is a path, encoded bytes, a PIL image, a numpy array (H, W) / (H, W, C) or a
        tensor (H, W) / (C, H, W), with C = 1, 3 or 4, uint8 or floats in [0, 1]; any size.
        The options are those of :class:`DecodeOptions`. ``return_attention`` adds each
        caption's attention-map picture (a PIL image). ``batch_size`` overrides
        :attr:`batch_size` for this call. Raises ValueError (one line, naming the image by its
        index) for an image that cannot be read or a bad option.
        """
        opts = DecodeOptions(
            strategy=strategy,
            num_beams=num_beams,
            length_penalty=length_penalty,
            top_p=top_p,
            top_k=top_k,
            temperature=temperature,
            seed=seed,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        many, items = _as_list(images)
        if not items:
            raise ValueError("no images given")
        prepared = []
        for i, image in enumerate(items):
            try:
                prepared.append(self.prepare(image, attention=return_attention))
            except ValueError as e:
                name = f" ({image})" if isinstance(image, (str, os.PathLike)) else ""
                raise ValueError(f"image {i}{name}: {e}") from None
        out = self.caption_prepared(
            prepared, opts, attention=return_attention, batch_size=batch_size
        )
        return out if many else out[0]

    @torch.inference_mode()
    def caption_prepared(
        self,
        items: Sequence[Prepared],
        options: DecodeOptions,
        attention: bool = False,
        batch_size: int | None = None,
    ) -> list[Caption]:
        """Caption prepared images in batches of ``batch_size`` rows -> one Caption each.

        Sampling with a seed (the items' own, else ``options.seed`` and the item's index) draws
        each image from its own stream: the same caption in any batch, alone or not."""
        from fastcap.generate import decode_texts, generate, length_penalty_factor

        rows = batch_size or self.batch_size
        chunk = max(1, rows // options.rows_per_image())
        seeds = _row_seeds(items, options)
        out: list[Caption] = []
        for s in range(0, len(items), chunk):
            part = items[s : s + chunk]
            x = torch.stack([p.pixels for p in part]).to(self.device)  # uint8: model normalises
            kw = options.generate_kwargs()
            if seeds is not None:
                kw.pop("seed")
                kw["row_seeds"] = torch.tensor(seeds[s : s + chunk], device=self.device)
            gen = generate(self.model, x, strategy=options.strategy, **kw)
            texts = decode_texts(self.tokenizer, gen)
            lens = gen.lens.cpu()
            scores = gen.scores.float().cpu()
            logp = scores
            if options.strategy == "beam":  # undo the length penalty: the plain sum
                logp = scores * length_penalty_factor(lens.float(), options.length_penalty)
            tokens = gen.tokens.cpu()
            maps = self._attention(x, part, gen) if attention else [None] * len(part)
            for b in range(len(part)):
                out.append(
                    Caption(
                        text=texts[b],
                        logprob=float(logp[b]),
                        score=float(scores[b]),
                        tokens=tokens[b, : int(lens[b])].tolist(),
                        attention=maps[b],
                    )
                )
        return out

    def _attention(self, x: Tensor, part: Sequence[Prepared], gen) -> list[Image.Image]:
        """The attention-map pictures of a batch, drawn by fastcap.attention_maps (which writes
        PNG files: they are read back from a temporary folder)."""
        from fastcap.attention_maps import MAIN, write_maps
        from fastcap.data.images import _fit as fit

        display = [
            Image.fromarray(
                (p.display if p.display is not None else fit(p.pixels, MAIN))
                .permute(1, 2, 0)
                .numpy()
            )
            for p in part
        ]
        with tempfile.TemporaryDirectory(prefix="fastcap-maps-") as tmp:
            paths = [Path(tmp) / f"{b}.png" for b in range(len(part))]
            write_maps(self.model, self.tokenizer, x, display, gen.tokens, gen.lens, paths)
            pictures = []
            for path in paths:
                with Image.open(path) as im:
                    im.load()
                    pictures.append(im.copy())
        return pictures

    def info(self) -> dict:
        """What the model is, for logs and /healthz."""
        cfg = self.model.cfg
        return {
            "source": str(self.source) if self.source else None,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "image_size": self.image_size,
            "max_new_tokens": self.max_new_tokens,
            "vocab_size": cfg.vocab_size,
            "batch_size": self.batch_size,
        }


def load(path, device=None, dtype=None, batch_size: int | None = None) -> ImageCaptioner:
    """A run folder or a bundle -> :class:`ImageCaptioner`.

    ``device``: default the GPU when there is one. ``dtype``: fp32, fp16, bf16 or a torch
    dtype; default :func:`default_dtype` (bf16 from sm_80, fp16 on a T4, else fp32).
    ``batch_size``: rows per decoding batch; default from the device
    (:func:`default_batch_size`). Raises :class:`fastcap.runs.RunError` (a ValueError) when the
    folder cannot be loaded.
    """
    from fastcap.runs import load_run

    dev = default_device() if device is None else torch.device(device)
    model, tokenizer, _ = load_run(path, dev, default_dtype(dev) if dtype is None else dtype)
    return ImageCaptioner(model, tokenizer, batch_size=batch_size, source=path)


__all__ = ["Caption", "DecodeOptions", "ImageCaptioner", "Prepared", "load", "to_uint8"]

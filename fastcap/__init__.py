"""fastcap: a fast image-captioning trainer, and a library to caption with what it trained.

``fastcap.load(path)`` (a run folder or a bundle) returns a :class:`fastcap.api.ImageCaptioner`;
see :mod:`fastcap.api`.
"""

__version__ = "0.1.0"


def load(path, device=None, dtype=None, batch_size=None):
    """A run folder or a bundle -> :class:`fastcap.api.ImageCaptioner`; see
    :func:`fastcap.api.load` (imported here on first call, so ``import fastcap`` stays light)."""
    from fastcap.api import load as _load

    return _load(path, device=device, dtype=dtype, batch_size=batch_size)

"""fastcap: a fast image-captioning trainer."""

__version__ = "0.1.0"

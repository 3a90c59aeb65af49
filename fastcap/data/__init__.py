"""Datasets, the shapes generator and the tokenizer.

Layering (no module imports one above it; ``tests/test_imports.py`` checks it):

* leaves: :mod:`~fastcap.data.records` (Record, Batch, DataError, bad-record accounting),
  :mod:`~fastcap.data.images` (decoding, normalisation), :mod:`~fastcap.data.tokenizer`;
* readers, one format each: :mod:`~fastcap.data.karpathy`, :mod:`~fastcap.data.captionset`,
  :mod:`~fastcap.data.stream`, :mod:`~fastcap.data.wds`, :mod:`~fastcap.data.shard`,
  :mod:`~fastcap.data.shapes`;
* :mod:`~fastcap.data.sources`: the ``--data kind:path`` spec, behind ``open_split``.
"""

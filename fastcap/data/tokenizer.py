"""Byte-level BPE caption tokenizer (the ``tokenizers`` library), saved as one JSON file.

Special tokens have fixed ids so a model built for one tokenizer agrees with another:
``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3.

Text is lower-cased (the normaliser) and a space is put before the first word (so "red" at the
start of a caption and in its middle is the same token); :meth:`CaptionTokenizer.decode` removes
that one space again, so ``decode(encode(t)) == t.lower()`` for any text ``t`` without leading
space whose characters the tokenizer knows.

Alphabet: a byte-level BPE normally starts from all 256 byte symbols. When ``vocab_size`` leaves
room for them they are all kept and no text ever needs ``<unk>``; a small vocabulary (the shapes
captions need about 30 characters and 25 words, so 64-128 is plenty) starts from the characters
seen in training instead, and a character never seen there encodes to ``<unk>``.

Decoding never returns U+FFFD: a byte-level BPE can emit ids whose bytes are not valid UTF-8 (a
character cut mid-way, a stray continuation byte), which the library's own decoder turns into
replacement characters. :meth:`CaptionTokenizer.decode` joins the tokens' bytes itself and drops
the bytes that do not form a whole character (and a literal U+FFFD, itself the mark of broken
bytes upstream).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # in id order


def _byte_of_symbol() -> dict[str, int]:
    """The byte-level alphabet inverted: symbol -> byte. GPT-2's table, which ``tokenizers``'
    ByteLevel uses: printable bytes stand for themselves, the other 68 are shifted to 256+."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in keep]
    table = {chr(b): b for b in keep}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


_BYTE_OF_SYMBOL = _byte_of_symbol()


def _token_bytes(token: str) -> bytes:
    """The bytes a vocabulary token stands for; a character outside the byte-level alphabet
    (not made by this tokenizer's trainer) stands for its own UTF-8."""
    return b"".join(
        bytes([_BYTE_OF_SYMBOL[c]]) if c in _BYTE_OF_SYMBOL else c.encode() for c in token
    )


class CaptionTokenizer:
    """A trained byte-level BPE with pad/bos/eos ids. Build with :meth:`train` or :meth:`load`."""

    def __init__(self, tokenizer: Tokenizer):
        for i, tok in enumerate(SPECIALS):
            if tokenizer.token_to_id(tok) != i:
                raise ValueError(
                    f"not a fastcap caption tokenizer: {tok!r} must have id {i}, "
                    f"has {tokenizer.token_to_id(tok)}"
                )
        self._tok = tokenizer
        # id -> bytes, specials empty: decode is a join and one UTF-8 decode
        self._bytes = [
            b"" if i < len(SPECIALS) else _token_bytes(tokenizer.id_to_token(i) or "")
            for i in range(tokenizer.get_vocab_size())
        ]

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 128, min_frequency: int = 2
    ) -> CaptionTokenizer:
        """Learn a BPE of at most ``vocab_size`` tokens (specials included) from ``texts``."""
        if vocab_size <= len(SPECIALS):
            raise ValueError(
                f"vocab_size must exceed {len(SPECIALS)} (the specials), got {vocab_size}"
            )
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        full = pre_tokenizers.ByteLevel.alphabet()
        alphabet = full if vocab_size >= len(full) + len(SPECIALS) else []
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIALS),
            initial_alphabet=alphabet,
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one JSON file (``tokenizers``' own format)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CaptionTokenizer:
        return cls(Tokenizer.from_file(str(path)))

    # ---- ids ---------------------------------------------------------------------------------

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encode / decode ---------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; no specials unless asked for."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """:meth:`encode` over a list (parallel inside ``tokenizers``); ragged, not padded."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        pre, post = [self.bos_id] * add_bos, [self.eos_id] * add_eos
        return [pre + e.ids + post for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: stops at the first ``<eos>``, drops the other specials (``<unk>``
        included) and every byte that is not part of a whole UTF-8 character (the bytes of a
        character cut mid-way, a stray continuation byte), so the text never holds U+FFFD.
        Raises ValueError for an id outside the vocabulary."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        raw = b"".join(self._bytes[i] for i in ids)
        text = raw.decode("utf-8", errors="ignore").replace("\ufffd", "")
        # The pre-tokenizer put one space before the first word; take exactly that one back.
        return text[1:] if text.startswith(" ") else text

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

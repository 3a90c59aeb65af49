"""The caption tokenizer: special ids, exact round trip of the shapes captions, save/load,
batching, decoding rules (stop at eos, drop specials, repair broken UTF-8), unknown characters,
bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from fastcap.data.shapes import references, sample_scene
from fastcap.data.tokenizer import CaptionTokenizer


def _captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        split = "compositional" if i % 5 == 0 else "train"
        out += references(*sample_scene(rng, split, 64))
    return out


@pytest.fixture(scope="module")
def corpus():
    seed = int(np.random.default_rng().integers(0, 2**31))
    return _captions(400, seed), _captions(50, seed + 1)


@pytest.fixture(scope="module")
def tok(corpus):
    return CaptionTokenizer.train(corpus[0], vocab_size=128)


def test_special_ids_and_size(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert 30 < tok.vocab_size <= 128 and len(tok) == tok.vocab_size


def test_round_trip_is_exact(tok, corpus):
    train, held_out = corpus
    for text in train + held_out:
        ids = tok.encode(text)
        assert all(i >= 4 for i in ids), "encode must not add specials or <unk>"
        assert tok.decode(ids) == text
        # 128 tokens leave room for a merge up to every word of the grammar: one token each.
        assert len(ids) == len(text.split()), text
    assert tok.decode(tok.encode("A Small RED Circle")) == "a small red circle"


def test_bos_eos_and_batch(tok, corpus):
    texts = corpus[1][:17]
    batch = tok.encode_batch(texts, add_bos=True, add_eos=True)
    for text, ids in zip(texts, batch):
        plain = tok.encode(text)
        assert ids == [tok.bos_id, *plain, tok.eos_id]
        assert tok.encode(text, add_bos=True, add_eos=True) == ids
        assert tok.decode(ids) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode_batch(batch) == texts
    assert tok.encode_batch([]) == []


def test_decode_stops_at_eos_and_drops_specials(tok):
    a, b = tok.encode("a small red circle"), tok.encode("one large white star")
    pad = [tok.pad_id] * 3
    assert tok.decode([tok.bos_id, *a, tok.eos_id, *b, tok.eos_id, *pad]) == "a small red circle"
    assert tok.decode([tok.bos_id, *a, *pad]) == "a small red circle"
    assert tok.decode([tok.eos_id, *a]) == ""
    assert tok.decode([]) == ""
    import torch  # decode takes any iterable of ints, a tensor row included

    assert tok.decode(torch.tensor([tok.bos_id, *a, tok.eos_id])) == "a small red circle"


def test_unknown_characters(tok):
    ids = tok.encode("a zebra!")  # 'z' and '!' are not in the shapes captions
    assert tok.unk_id in ids
    assert "<unk>" not in tok.decode(ids)


def test_full_byte_alphabet_when_vocab_allows(big):
    for text in ["a zebra! ünïcödé 🦓", "tabs\tand  double  spaces", "x"]:
        ids = big.encode(text)
        assert big.unk_id not in ids
        assert big.decode(ids) == text.lower()


@pytest.fixture(scope="module")
def big(corpus):
    """The full 256-byte alphabet: any byte sequence, valid UTF-8 or not, can be emitted."""
    return CaptionTokenizer.train(corpus[0], vocab_size=300)


def test_decode_drops_broken_utf8(big):
    # the corpus is ASCII, so every byte of a non-ASCII character is its own token
    e_acute = big.encode("é")[1:]  # after the prefix space: 0xC3, 0xA9
    zebra = big.encode("🦓")[1:]  # 0xF0 0x9F 0xA6 0x93
    assert len(e_acute) == 2 and len(zebra) == 4
    red = big.encode("a red")
    # a character cut mid-way at the end: its leading bytes go
    assert big.decode(red + big.encode(" é")[:-1]) == "a red "
    for cut in (1, 2, 3):
        assert big.decode(red + big.encode(" 🦓")[:-cut]) == "a red "
    # a stray continuation byte at the start, or a lead byte inside, goes too
    assert big.decode(e_acute[1:] + red) == "a red"
    assert big.decode(zebra[2:] + red) == "a red"
    assert big.decode(big.encode("a") + zebra[:1] + big.encode(" red")) == "a red"
    # valid sequences are unchanged
    for text in ["a red é", "🦓 a zebra", "ünïcödé 🦓é", "a red"]:
        assert big.decode(big.encode(text)) == text
    # a literal U+FFFD is the mark of bytes broken upstream: never returned either
    assert big.decode(big.encode("a \ufffd red")) == "a  red"


def test_decode_of_random_ids_drops_what_the_library_would_replace(big):
    """Any id sequence: no U+FFFD, and exactly the library's (lossy) text without its
    replacement characters, so a valid sequence decodes as it always did."""
    rng = np.random.default_rng()
    for _ in range(300):
        ids = rng.integers(4, big.vocab_size, int(rng.integers(1, 12))).tolist()
        text = big.decode(ids)
        assert "\ufffd" not in text, ids
        lossy = big._tok.decode(ids).replace("\ufffd", "")
        assert text == (lossy[1:] if lossy.startswith(" ") else lossy), ids


def test_save_load(tmp_path, tok, corpus):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    json.loads(path.read_text())  # one JSON file
    again = CaptionTokenizer.load(path)
    assert again.vocab_size == tok.vocab_size
    texts = corpus[1]
    assert again.encode_batch(texts) == tok.encode_batch(texts)
    assert [again.decode(tok.encode(t)) for t in texts] == texts


def test_training_is_deterministic(corpus):
    a = CaptionTokenizer.train(corpus[0], vocab_size=80)
    b = CaptionTokenizer.train(corpus[0], vocab_size=80)
    assert a._tok.to_str() == b._tok.to_str()


def test_bad_input(tmp_path, tok):
    with pytest.raises(ValueError, match="vocab_size"):
        CaptionTokenizer.train(["a b"], vocab_size=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    foreign = Tokenizer(models.BPE(vocab={"a": 0, "<pad>": 1}, merges=[]))
    path = tmp_path / "foreign.json"
    foreign.save(str(path))
    with pytest.raises(ValueError, match="'<pad>' must have id 0"):
        CaptionTokenizer.load(path)

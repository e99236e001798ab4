"""Streamed text goes out as soon as its characters are decided (serve/token_bytes.py).

A character is decided once no later byte can change it: the text the bytes so far share with
every one-byte extension of them (one more byte tells an incomplete character from an invalid
one). Byte-level tokenizers must send at least what Python's incremental UTF-8 decoder sends
(it holds a few invalid runs, such as a surrogate's first bytes, a little longer) and never
more than is decided; byte-fallback ones may hold longer.
"""

from __future__ import annotations

import codecs
import os

import pytest
import torch

from torch_elastic_kv.serve.default_model import EOS_ID, build_default_tokenizer
from torch_elastic_kv.serve.detokenize import IncrementalDetokenizer
from torch_elastic_kv.serve.token_bytes import (
    BYTE_FALLBACK,
    BYTE_LEVEL,
    TokenBytes,
    byte_level_alphabet,
    ends_inside_a_character,
)

BYTE0 = 8  # the default tokenizer's id of byte 0x00


@pytest.fixture(scope="module")
def tokenizer():
    return build_default_tokenizer()


def _reference(chunks: list[bytes]) -> list[str]:
    """What Python's incremental decoder returns after each chunk, then at the end."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    return [decoder.decode(c) for c in chunks] + [decoder.decode(b"", final=True)]


def _decided(raw: bytes) -> str:
    texts = [raw.decode("utf-8", "replace")] + [(raw + bytes([b])).decode("utf-8", "replace") for b in range(256)]
    return os.path.commonprefix(texts)


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(t) for t in ids] + [detok.flush()]


def test_byte_level_sends_each_character_once_it_is_decided(tokenizer):
    table = TokenBytes.for_tokenizer(tokenizer)
    assert table is not None and table.kind == BYTE_LEVEL
    g = torch.Generator().manual_seed(3)
    # bytes drawn mostly from the non-ASCII half, where characters are incomplete or invalid
    for _ in range(200):
        n = int(torch.randint(1, 24, (1,), generator=g))
        raw = torch.where(
            torch.rand(n, generator=g) < 0.8,
            torch.randint(0x80, 0x100, (n,), generator=g),
            torch.randint(0x20, 0x80, (n,), generator=g),
        ).tolist()
        ids = [BYTE0 + b for b in raw]
        got = _stream(IncrementalDetokenizer(tokenizer, [1], token_bytes=table), ids)
        ref = _reference([bytes([b]) for b in raw])
        for i in range(1, n + 1):
            sent, early = "".join(got[:i]), "".join(ref[:i])
            assert early == sent[: len(early)] and sent == _decided(bytes(raw[:i]))[: len(sent)], [hex(b) for b in raw]
        assert "".join(got) == tokenizer.decode(ids, skip_special_tokens=True) == bytes(raw).decode("utf-8", "replace")


def test_byte_level_examples(tokenizer):
    table = TokenBytes.for_tokenizer(tokenizer)

    def stream(raw: bytes) -> list[str]:
        return _stream(IncrementalDetokenizer(tokenizer, [1], token_bytes=table), [BYTE0 + b for b in raw])

    assert stream("€".encode()) == ["", "", "€", ""]  # a character arriving byte by byte
    assert stream(b"\x82A") == ["\ufffd", "A", ""]  # a lone continuation byte: decided at once
    assert stream(b"\xf0\xe2\x82\xac") == ["", "\ufffd", "", "€", ""]  # F0 is decided by E2
    assert stream(b"\xe2") == ["", "\ufffd"]  # still incomplete at the end
    # without the table, every trailing U+FFFD is held: the text is the same, later
    d = IncrementalDetokenizer(tokenizer, [1])
    assert _stream(d, [BYTE0 + 0x82, BYTE0 + ord("A")]) == ["", "\ufffdA", ""]


def test_skipped_special_tokens_add_no_bytes(tokenizer):
    table = TokenBytes.for_tokenizer(tokenizer)
    assert table(EOS_ID) == b"" and table(BYTE0 + 0xE2) == b"\xe2" and table(BYTE0 + ord(" ")) == b" "
    d = IncrementalDetokenizer(tokenizer, [1], token_bytes=table)
    assert _stream(d, [BYTE0 + 0xE2, EOS_ID, BYTE0 + 0x82, BYTE0 + 0xAC]) == ["", "", "", "€", ""]
    kept = TokenBytes.for_tokenizer(tokenizer, skip_special_tokens=False)
    assert kept(EOS_ID) == b"</s>"
    with pytest.raises(ValueError, match="skip_special_tokens=False, the detokenizer has True"):
        IncrementalDetokenizer(tokenizer, [1], token_bytes=kept)


def _byte_level_tokenizer_with_merges():
    """A byte-level vocabulary whose pieces may hold several bytes, as GPT-2's do."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    char = byte_level_alphabet()
    vocab = {char[b]: b for b in range(256)}
    for piece in (b"\xe2\x82", b"\xac!", b"ab"):
        vocab["".join(char[b] for b in piece)] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core), vocab, char


def test_byte_level_pieces_of_several_bytes():
    tok, vocab, char = _byte_level_tokenizer_with_merges()
    table = TokenBytes.for_tokenizer(tok)
    assert table is not None and table.kind == BYTE_LEVEL

    def ids(*pieces: bytes) -> list[int]:
        return [vocab["".join(char[b] for b in p)] for p in pieces]

    for pieces in ((b"\xe2\x82", b"\xac!"), (b"\xe2\x82", b"ab"), (b"\x90", b"\xe2\x82", b"\xe2\x82", b"\xac!")):
        d = IncrementalDetokenizer(tok, ids(b"ab"), token_bytes=table)
        assert _stream(d, ids(*pieces)) == _reference(list(pieces)), pieces
    assert "".join(_stream(IncrementalDetokenizer(tok, [], token_bytes=table), ids(b"\xe2\x82", b"ab"))) == "\ufffdab"


def _byte_fallback_tokenizer():
    """A SentencePiece-style vocabulary: words with "▁" for a space, and ``<0xNN>`` byte pieces."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁hi": 1, "!": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>"), vocab


def test_byte_fallback_holds_incomplete_characters_and_sends_invalid_bytes():
    tok, vocab = _byte_fallback_tokenizer()
    table = TokenBytes.for_tokenizer(tok)
    assert table is not None and table.kind == BYTE_FALLBACK
    byte = {b: vocab[f"<0x{b:02X}>"] for b in range(256)}
    assert table(byte[0xE2]) == b"\xe2" and table(vocab["▁hi"]) == b" hi"

    def stream(ids: list[int]) -> list[str]:
        out = _stream(IncrementalDetokenizer(tok, [vocab["▁hi"]], token_bytes=table), ids)
        assert "".join(out) == tok.decode(ids), ids
        return out

    assert stream([byte[0xE2], byte[0x82], byte[0xAC]]) == ["", "", "€", ""]
    assert stream([byte[0x82], vocab["!"]]) == ["\ufffd", "!", ""]  # invalid at once: sent at once
    # F0 then E2: byte fallback shows both as U+FFFD until the run is valid; nothing is sent early
    assert stream([byte[0xF0], byte[0xE2], vocab["!"]])[:2] == ["", ""]


def test_tokenizers_without_byte_pieces_have_no_table():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<unk>": 0, "▁hello": 1}, unk_token="<unk>"))
    core.decoder = decoders.Metaspace()
    assert TokenBytes.for_tokenizer(PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")) is None
    assert TokenBytes.for_tokenizer(object()) is None


def test_ends_inside_a_character():
    assert ends_inside_a_character(b"\xe2\x82") and ends_inside_a_character(b"abc\xf0")
    assert not ends_inside_a_character(b"\xe2\x82\xac") and not ends_inside_a_character(b"\x82")
    assert not ends_inside_a_character(b"\xe2A") and not ends_inside_a_character(b"")


def test_added_tokens_read_as_byte_level_pieces():
    # under a byte-level decoder an added token whose characters are all in the alphabet stands
    # for those bytes ("é" is byte 0xE9): "xé" then 0x82 0xAC decodes to "x" + U+90AC
    tok, vocab, char = _byte_level_tokenizer_with_merges()
    tok.add_tokens(["x\u00e9"])
    added = tok.convert_tokens_to_ids("x\u00e9")
    table = TokenBytes.for_tokenizer(tok)
    assert table(added) == b"x\xe9"
    ids = [added, vocab[char[0x82]], vocab[char[0xAC]]]
    got = _stream(IncrementalDetokenizer(tok, [], token_bytes=table), ids)
    assert "".join(got) == tok.decode(ids) == "x\u90ac" and got[0] == "x"

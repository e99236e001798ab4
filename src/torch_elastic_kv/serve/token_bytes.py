"""The UTF-8 bytes each token adds to a decoded text, for the tokenizers that say so.

A streamed text can be sent once its characters are decided. Text decoding ends in U+FFFD
both while a multi-byte character is still arriving (its next bytes would complete it) and
after bytes that no later byte can complete (a lone continuation byte, an invalid lead byte):
the text alone cannot tell the two apart, the bytes can. ``TokenBytes`` gives a token's bytes
for the two decoders that turn bytes into text, so a detokenizer holds back only the first
case: byte-level BPE (GPT-2, Llama 3, Qwen: every vocabulary character stands for one byte)
and SentencePiece's byte fallback (Llama 2, Mistral, Gemma: ``<0xNN>`` pieces). Any other
decoder gives ``None`` and the caller keeps holding on every trailing U+FFFD.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterable
from typing import Any, Optional

__all__ = ["BYTE_FALLBACK", "BYTE_LEVEL", "TokenBytes", "byte_level_alphabet", "ends_inside_a_character"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[int, str]:
    """Byte-level BPE's character for each byte (GPT-2's alphabet): printable Latin-1 bytes stand
    for themselves, the others take the code points from 256 up, in byte order, so every byte is
    a visible, whitespace-free character."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _decoder_kinds(decoder: Optional[dict]) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return {kind for d in decoder.get("decoders", []) for kind in _decoder_kinds(d)}
    return {str(decoder.get("type"))}


def ends_inside_a_character(data: bytes) -> bool:
    """True when ``data`` ends with the first bytes of a UTF-8 character that later bytes could
    still complete; False when every character in it is decided (U+FFFD for invalid bytes)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)
    return bool(decoder.getstate()[0])


BYTE_LEVEL = "byte-level"
BYTE_FALLBACK = "byte-fallback"


class TokenBytes:
    """A token id's UTF-8 bytes in the decoded text, looked up once per id.

    Build with ``TokenBytes.for_tokenizer(tokenizer, skip_special_tokens)``, which returns
    ``None`` for a tokenizer whose decoder is neither byte-level nor byte fallback (or that
    has no ``tokenizers`` backend). Special tokens add no bytes when they are skipped.
    ``kind`` is ``BYTE_LEVEL`` (the text's bytes are decoded as one UTF-8 string, an
    incomplete character at the end showing as a single U+FFFD) or ``BYTE_FALLBACK`` (a run
    of byte pieces that is not valid UTF-8 shows one U+FFFD per byte).
    """

    def __init__(
        self,
        kind: str,
        piece_bytes: Callable[[str], Optional[bytes]],
        pieces: Callable[[int], Any],
        added: dict[int, Any],
        skip_special_tokens: bool,
    ) -> None:
        self.kind = kind
        self._piece_bytes = piece_bytes
        self._pieces = pieces
        self._added = added
        self.skip_special_tokens = skip_special_tokens
        self._cache: dict[int, Optional[bytes]] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, skip_special_tokens: bool = True) -> Optional[TokenBytes]:
        """The byte table of ``tokenizer`` (a Hugging Face tokenizer), or None when its decoder
        does not map pieces to bytes."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        try:
            kinds = _decoder_kinds(json.loads(backend.to_str()).get("decoder"))
        except (ValueError, AttributeError, TypeError):
            return None
        added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        if "ByteLevel" in kinds:
            kind = BYTE_LEVEL
            alphabet = {c: b for b, c in byte_level_alphabet().items()}

            def piece_bytes(piece: str) -> Optional[bytes]:
                try:
                    return bytes(alphabet[c] for c in piece)
                except KeyError:  # a character outside the byte alphabet: not a byte-level piece
                    return None

        elif "ByteFallback" in kinds:
            kind = BYTE_FALLBACK

            def piece_bytes(piece: str) -> Optional[bytes]:
                match = _BYTE_PIECE.fullmatch(piece)
                if match:
                    return bytes([int(match.group(1), 16)])
                # whole characters, "▁" standing for a space (one the decoder strips at the
                # start of a text aside): complete UTF-8 either way
                return piece.replace("\u2581", " ").encode("utf-8")

        else:
            return None
        return cls(kind, piece_bytes, tokenizer.convert_ids_to_tokens, added, skip_special_tokens)

    def __call__(self, token_id: int) -> Optional[bytes]:
        """The bytes ``token_id`` adds to a text, or None when unknown."""
        if token_id not in self._cache:
            self._cache[token_id] = self._lookup(token_id)
        return self._cache[token_id]

    def _lookup(self, token_id: int) -> Optional[bytes]:
        token = self._added.get(token_id)
        if token is not None:
            if getattr(token, "special", False) and self.skip_special_tokens:
                return b""
            # the decoder reads an added token's content as a piece too: byte-level maps it
            # through the alphabet when every character is in it (as its own content otherwise)
            content = str(getattr(token, "content", token))
            as_piece = self._piece_bytes(content)
            return as_piece if as_piece is not None else content.encode("utf-8")
        piece = self._pieces(token_id)
        return self._piece_bytes(piece) if isinstance(piece, str) else None

    def join(self, ids: Iterable[int]) -> Optional[bytes]:
        """The bytes of ``ids`` in order, or None when any of them is unknown."""
        parts = []
        for i in ids:
            b = self(i)
            if b is None:
                return None
            parts.append(b)
        return b"".join(parts)

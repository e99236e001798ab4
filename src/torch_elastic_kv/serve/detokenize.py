"""Token ids to text, one token at a time, and stop strings.

The Engine produces token ids; a client reads text. ``IncrementalDetokenizer`` turns each new
token into the text it adds: it decodes a short window that ends at the new token and takes
what the window gained over the same window without it, starting the window a few tokens back
so tokenizers whose pieces depend on their left neighbour (a leading space, a byte fallback)
decode as they would in the full text (but never inside a character the prompt leaves
incomplete: the output's text is that of its own tokens), and holding text back while it ends in
the first bytes of a multi-byte character that the next tokens could complete. Where the
tokenizer's bytes are known (``TokenBytes``) a U+FFFD that no later byte can change (a lone
continuation byte) goes out at once; otherwise any trailing U+FFFD is held. ``StopStrings``
then finds the first stop string in the text so far, and says how much of the text is safe to
send: a stream never shows a prefix of a stop string that the next token could complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from .token_bytes import BYTE_LEVEL, TokenBytes, ends_inside_a_character

__all__ = ["IncrementalDetokenizer", "StopStrings"]

# Prompt tokens the first window starts with, so the first output token decodes in context.
_CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes one request's output ids as they come.

    ``add(token_id)`` returns the text that token adds (possibly ``""`` while a character is
    incomplete; ``holding`` then says so); ``flush()`` returns what was held back, at the end
    of the request. The text of all ``add`` and ``flush`` results equals
    ``tokenizer.decode(output_ids, skip_special_tokens=...)`` for tokenizers that decode piece
    by piece (byte-level BPE, SentencePiece). ``token_bytes``: the tokenizer's ``TokenBytes`` (built once per tokenizer,
    with the same ``skip_special_tokens``), or None to hold text on every trailing U+FFFD.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
        token_bytes: Optional[TokenBytes] = None,
    ) -> None:
        if token_bytes is not None and token_bytes.skip_special_tokens != skip_special_tokens:
            raise ValueError(
                f"IncrementalDetokenizer: token_bytes was built with skip_special_tokens="
                f"{token_bytes.skip_special_tokens}, the detokenizer has {skip_special_tokens}"
            )
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_bytes = token_bytes
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # the window starts here
        self._read = len(self.ids)  # text of ids[:_read] has been returned
        self._sent_ahead = 0  # characters of ids[_read:]'s text returned already (decided ones)
        self.holding = False  # the last add held text back: a character still incomplete
        self._context_checked = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one output token; return the new text it completes."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text held back (an incomplete character at the end), once no token follows."""
        return self._advance(final=True)

    def _check_context(self) -> None:
        # A prompt that ends inside a character would join its bytes with the first output
        # tokens, which decode(output_ids) shows on their own: end the context before them.
        # Done at the first token, where decoding already runs (not in the caller's thread).
        self._context_checked = True
        context = self.ids[: self._read]
        while context and self._decode(context).endswith(_REPLACEMENT):
            context.pop()
        self.ids = context + self.ids[self._read :]
        self._read = len(context)

    def _undecided_tail(self) -> Optional[int]:
        """How many characters at the end of the window's text (which ends in U+FFFD) may still
        change: 0 when none, None when that is unknown (then nothing past ``_read`` is sent)."""
        # Text past _read goes out only where no character is pending, so ids[_read:] starts
        # on a character boundary.
        if self.token_bytes is None:
            return None
        data = self.token_bytes.join(self.ids[self._read :])
        if data is None:
            return None
        if not ends_inside_a_character(data):
            return 0
        # byte-level text shows the incomplete character as one U+FFFD; byte fallback shows
        # one per byte, and those may all turn into the character
        return 1 if self.token_bytes.kind == BYTE_LEVEL else None

    def _advance(self, final: bool) -> str:
        if not self._context_checked:
            self._check_context()
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        start = len(before) + self._sent_ahead
        if len(after) <= start and not final:
            self.holding = False
            return ""  # a token that decodes to nothing (a special token) or not yet
        undecided = self._undecided_tail() if after.endswith(_REPLACEMENT) and not final else 0
        self.holding = undecided != 0
        if undecided is None:
            return ""
        if undecided:  # send what is decided; the window keeps its start
            decided = after[start:-undecided]
            self._sent_ahead += len(decided)
            return decided
        delta = after[start:]
        self._prefix, self._read, self._sent_ahead = self._read, len(self.ids), 0
        return delta


class StopStrings:
    """The first occurrence of any stop string in a growing text, and the part safe to send.

    ``feed(delta)`` appends text and returns True once a stop string is complete; ``text``
    is then cut just before it. ``sendable(final)`` is how many leading characters of
    ``text`` may go to a client: all of it once final (or stopped), else all but the last
    ``longest stop - 1`` characters, which a later token could turn into a stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop strings must be non-empty strings")
        self.stops = tuple(stops)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.stopped: Optional[str] = None  # the stop string found

    def feed(self, delta: str, check: bool = True) -> bool:
        """Append ``delta``; ``check=False`` (a request short of its ``min_tokens``) only appends:
        a stop string that ends in that text never stops the request, as in vLLM."""
        if self.stopped is not None or not delta:
            return self.stopped is not None
        start = max(0, len(self.text) - self._hold)  # a stop may begin in the old text
        self.text += delta
        if not check:
            return False
        best = -1
        for s in self.stops:
            i = self.text.find(s, start)
            if i != -1 and (best == -1 or i < best):
                best, self.stopped = i, s
        if best != -1:
            self.text = self.text[:best]
            return True
        return False

    def sendable(self, final: bool) -> int:
        if final or self.stopped is not None or not self.stops:
            return len(self.text)
        return max(0, len(self.text) - self._hold)

"""Log-probabilities in OpenAI's response shapes, from the Engine's ``TokenLogprob`` entries.

Chat: ``choices[].logprobs = {"content": [{token, logprob, bytes, top_logprobs: [{token,
logprob, bytes}]}]}``, ``top_logprobs`` the N most likely. Completions: ``choices[].logprobs =
{tokens, token_logprobs, top_logprobs, text_offset}``, each ``top_logprobs`` entry a dict
token -> logprob holding the N most likely and the chosen token (so up to N + 1 entries, as
OpenAI and vLLM), ``None`` for the first prompt token of an ``echo`` (nothing scores it).

A token's text is ``tokenizer.decode([id])`` (special tokens kept), as vLLM writes it; a token
that is part of a multi-byte character decodes to U+FFFD, and ``bytes`` is that text's UTF-8.
The values are log-probabilities of the raw model logits, before penalties, bias and
temperature (vLLM's default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from ..engine.request import TokenLogprob

__all__ = ["TokenText", "chat_logprobs", "completion_logprobs"]


class TokenText:
    """Token id -> its text, cached (one tokenizer's ids decode the same every time)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def _chat_entry(text: TokenText, token_id: int, logprob: float) -> dict[str, Any]:
    s = text(token_id)
    return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}


def chat_logprobs(text: TokenText, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat response (or one chunk's share of it)."""
    content = []
    for e in entries:
        item = _chat_entry(text, e.token_id, e.logprob)
        item["top_logprobs"] = [_chat_entry(text, t, lp) for t, lp in e.top]
        content.append(item)
    return {"content": content}


def completion_logprobs(
    text: TokenText, ids: Sequence[int], entries: Sequence[Optional[TokenLogprob]], offset: int = 0
) -> dict[str, Any]:
    """``choices[].logprobs`` of a completion for tokens ``ids`` (``entries[i]`` scores
    ``ids[i]``; None: unscored), ``text_offset`` counted from ``offset`` characters."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, e in zip(ids, entries):
        s = text(token_id)
        tokens.append(s)
        text_offset.append(offset)
        offset += len(s)
        if e is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(e.logprob)
        top = {text(t): lp for t, lp in e.top}
        top.setdefault(s, e.logprob)
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }

"""Incremental detokenisation for token streams.

Byte-level tokenizers split characters across tokens, so the text of a token is not always complete on its own.
Each new token's text is the difference between decoding a short window that includes it and the same window
without it; while that text ends in an incomplete UTF-8 sequence (U+FFFD) it is held back, and `flush()` at the
end releases whatever is left. The pieces, concatenated, equal `tokenizer.decode(all_ids)`.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
WINDOW = 6  # tokens of left context: enough for tokenizers that merge a leading space into the next token


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas."""

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        context = list(prompt_ids or [])[-WINDOW:]
        while context and self._decode(context).endswith(REPLACEMENT):  # a prompt cut mid-character
            context.pop()
        self.ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.num_prompt_context = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the text that became complete."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end), released as it decodes."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]

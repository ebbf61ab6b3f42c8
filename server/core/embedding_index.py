"""Embedding-only adapters by token: which of them a prompt writes (A1111's embeddings by name).

In A1111 an embedding in the embeddings folder applies wherever its name appears in a prompt;
nothing else names it. The server does the same for adapters that are embeddings alone (no LoRA
module): the registry keeps this index, rebuilt on upload, delete and rescan, so a request costs
one regex search per prompt, whatever the number of adapters, and no file is read.

A token is found as `prompt_encoding` finds it once its adapter is in the request's set (the same
`token_pattern`: case-insensitive, a whole word where it begins or ends with a word character), so
an embedding applied by name gives the image of the same embedding named in the request.
LoRAs, with or without bundled embeddings, are never applied by name: they change the whole model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .prompt_encoding import token_pattern


class EmbeddingTokenIndex:
    """Immutable: the registry swaps in a new index on each change, so readers take no lock."""

    def __init__(self, records: Iterable = ()):
        by_token: dict[str, list] = {}
        for record in records:
            if record.is_embedding_only:
                for token, _ in record.tokens:
                    by_token.setdefault(token.lower(), []).append(record)
        self._by_token = {t: tuple(sorted(rs, key=lambda r: r.name)) for t, rs in by_token.items()}
        self._pattern: re.Pattern | None = token_pattern(self._by_token) if self._by_token else None

    def __len__(self) -> int:
        return len(self._by_token)

    def written_in(self, text: str) -> dict[str, tuple]:
        """{token (lowercase): the embedding-only adapters with that token} for each indexed token
        the text writes, in order of first appearance. More than one adapter for a token means the
        name alone cannot say which was meant; the caller decides."""
        if self._pattern is None or not text:
            return {}
        found: dict[str, tuple] = {}
        for match in self._pattern.finditer(text):
            token = match.group(0).lower()
            if token not in found:
                found[token] = self._by_token[token]
        return found

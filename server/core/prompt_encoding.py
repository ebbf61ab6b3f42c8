"""Prompt -> CLIP token chunks -> text embeddings, with A1111's handling of long prompts.

CLIP reads 77 tokens (begin, 75 text tokens, end). A1111 does not cut a longer prompt: it
splits the tokens into chunks of 75, wraps and pads each chunk to 77, encodes the chunks
separately and concatenates the embeddings along the sequence axis (the UNet's
cross-attention accepts any context length). It breaks a chunk early at a comma found among
its last 20 tokens, so phrases stay whole. The negative prompt is padded with empty chunks to
the same count, so both halves of a CFG batch have one shape.

A prompt of up to 75 tokens gives exactly diffusers' tokenisation (padding="max_length",
truncation=True), which the parity test relies on.

Textual-inversion tokens. A request's adapters may bring embeddings (`PromptEmbedding`: a token
and its n vectors). Where the prompt writes such a token, its n vectors take n positions of the
chunk (`InjectedVector`), as diffusers' `load_textual_inversion` does with the added tokens
`<tok>`, `<tok>_1`, ...; the text around it is tokenised on its own, which is also what the
tokenizer does around an added token, so the ids match diffusers'. A token is found case-
insensitively (CLIP lowercases the prompt, and diffusers' added tokens match the lowercased
text); a token that begins or ends with a letter, digit or `_` only matches as a whole word there
(A1111 finds embedding names by their token ids, so "cat" does not fire inside "cats"; a
bracketed `<cat-toy>` matches anywhere, as in diffusers). An embedding's vectors stay in one
chunk: one that does not fit moves whole to the next (A1111's rule). Text without a known token
tokenises as before, so a token of no adapter in the set is just words.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

CHUNK_TEXT_TOKENS = 75
COMMA_BACKTRACK = 20
# The input id at a position whose token-table row is replaced by a vector: never read, as in
# A1111 (which also writes 0 there).
PLACEHOLDER_ID = 0


@dataclass(frozen=True)
class InjectedVector:
    """A chunk position that holds a textual-inversion vector instead of a token id.

    Equal and hashed by identity (the adapter's content hash, the token, the row), not by value:
    the content hash covers the vectors' bytes, so equal identities are equal vectors, and a chunk
    stays a cheap cache key that can never equal a chunk of plain ids.
    """

    source: str
    token: str
    index: int
    vector: torch.Tensor = field(compare=False, repr=False)


@dataclass(frozen=True, eq=False)
class PromptEmbedding:
    """A token a request may write, and its vectors (num_vectors, hidden size)."""

    token: str
    source: str  # the content hash of the adapter that brings it
    vectors: torch.Tensor

    def positions(self) -> list[InjectedVector]:
        return [InjectedVector(self.source, self.token, i, self.vectors[i]) for i in range(self.vectors.shape[0])]


def token_pattern(tokens) -> re.Pattern:
    """One regex for every token, longest first (so `<cat>_x` wins over `<cat>`)."""
    parts = []
    for token in sorted(tokens, key=len, reverse=True):
        part = re.escape(token)
        if re.match(r"\w", token[0]):
            part = r"(?<!\w)" + part
        if re.match(r"\w", token[-1]):
            part += r"(?!\w)"
        parts.append(part)
    return re.compile("|".join(parts), re.IGNORECASE)


class PromptTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.comma = tokenizer.convert_tokens_to_ids(",</w>")

    def text_tokens(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids

    def chunks(self, prompt: str, embeddings: Mapping[str, PromptEmbedding] | None = None) -> list[tuple]:
        """Each 77-position chunk of the prompt (at least one): token ids, and InjectedVectors
        where the prompt writes a token of `embeddings`."""
        pieces: list[list] = []
        current: list = []
        for unit in self._units(prompt, embeddings):
            if len(unit) > CHUNK_TEXT_TOKENS:
                raise ValueError(f"embedding {unit[0].token!r} has {len(unit)} vectors; a chunk holds {CHUNK_TEXT_TOKENS}")
            if len(current) + len(unit) > CHUNK_TEXT_TOKENS:
                if len(unit) == 1:
                    split = self._comma_split(current)
                    pieces.append(current[:split])
                    current = current[split:]
                else:  # an embedding's vectors are not split between chunks
                    pieces.append(current)
                    current = []
            current.extend(unit)
        pieces.append(current)
        return [self._wrap(p) for p in pieces]

    def _units(self, prompt: str, embeddings: Mapping[str, PromptEmbedding] | None) -> list[list]:
        """The prompt as units that must stay together: one token id, or one embedding's vectors."""
        if not embeddings:
            return [[t] for t in self.text_tokens(prompt)]
        by_token = {token.lower(): e for token, e in embeddings.items()}
        units: list[list] = []
        start = 0
        for match in token_pattern(embeddings).finditer(prompt):
            units += [[t] for t in self.text_tokens(prompt[start : match.start()])]
            units.append(by_token[match.group(0).lower()].positions())
            start = match.end()
        units += [[t] for t in self.text_tokens(prompt[start:])]
        return units

    def _comma_split(self, chunk: list[int]) -> int:
        for i in range(len(chunk) - 1, max(len(chunk) - 1 - COMMA_BACKTRACK, -1), -1):
            if chunk[i] == self.comma:
                return i + 1
        return len(chunk)

    def _wrap(self, text_ids: list) -> tuple:
        return tuple([self.bos, *text_ids, self.eos] + [self.pad] * (CHUNK_TEXT_TOKENS - len(text_ids)))

    def pair(
        self, prompt: str, negative_prompt: str, embeddings: Mapping[str, PromptEmbedding] | None = None
    ) -> tuple[list[tuple], list[tuple]]:
        """Chunks of the prompt and of the negative prompt, padded to the same count. The
        request's embeddings apply to both (a negative embedding is written in the negative)."""
        pos, neg = self.chunks(prompt, embeddings), self.chunks(negative_prompt, embeddings)
        empty = self._wrap([])
        while len(pos) < len(neg):
            pos.append(empty)
        while len(neg) < len(pos):
            neg.append(empty)
        return pos, neg


def has_vectors(chunk: tuple) -> bool:
    return any(isinstance(p, InjectedVector) for p in chunk)


def vector_sources(chunks) -> frozenset[str]:
    """The adapters (content hashes) whose vectors the chunks hold: the embeddings a prompt used."""
    return frozenset(p.source for chunk in chunks for p in chunk if isinstance(p, InjectedVector))


def encoder_inputs(chunks: list[tuple]) -> dict[str, torch.Tensor]:
    """Text-encoder inputs for chunks: `input_ids`, plus `token_vectors` / `token_vector_mask`
    when a chunk carries vectors (backends.base.TEXT_ENCODER_VECTOR_INPUTS)."""
    ids = torch.tensor([[p if isinstance(p, int) else PLACEHOLDER_ID for p in c] for c in chunks], dtype=torch.long)
    slots = [(row, col, p.vector) for row, c in enumerate(chunks) for col, p in enumerate(c) if isinstance(p, InjectedVector)]
    if not slots:
        return {"input_ids": ids}
    vectors = torch.zeros(*ids.shape, slots[0][2].shape[-1], dtype=torch.float32)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for row, col, vector in slots:
        vectors[row, col] = vector.float()
        mask[row, col] = True
    return {"input_ids": ids, "token_vectors": vectors, "token_vector_mask": mask}


class EmbeddingCache:
    """Chunk embeddings keyed by (chunk, adapter set): the text encoder runs once per new chunk.

    A chunk with injected vectors names them by identity (InjectedVector), so it never shares an
    entry with a plain chunk. Bounded by entry count; one SD1.5 chunk embedding is 77 x 768
    floats (236 KB).
    """

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def encode(
        self,
        chunk_lists: list[list[tuple]],
        adapter_key: tuple,
        run_text_encoder: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    ) -> list[torch.Tensor]:
        """Embed each list of chunks into one (1, 77*k, dim) tensor. The encoder runs batched on
        misses: plain chunks in one call (any engine can take it), chunks with vectors in another
        (torch only), so a textual-inversion token does not move the plain ones off a compiled
        engine."""
        missing = []
        for chunks in chunk_lists:
            for chunk in chunks:
                key = (chunk, adapter_key)
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.hits += 1
                elif chunk in missing:  # repeated within this call: encoded once
                    self.hits += 1
                else:
                    missing.append(chunk)
                    self.misses += 1
        fresh: dict[tuple, torch.Tensor] = {}
        plain = [c for c in missing if not has_vectors(c)]
        injected = [c for c in missing if has_vectors(c)]
        for group in (plain, injected):
            if group:
                hidden = run_text_encoder(encoder_inputs(group))
                fresh.update({chunk: hidden[i : i + 1] for i, chunk in enumerate(group)})
        if fresh:
            for chunk, emb in fresh.items():
                self._entries[(chunk, adapter_key)] = emb
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        result = []
        for chunks in chunk_lists:
            parts = [fresh[c] if c in fresh else self._entries[(c, adapter_key)] for c in chunks]
            result.append(torch.cat(parts, dim=1))
        return result

"""Prompt -> CLIP token chunks -> text embeddings, with A1111's handling of long prompts.

CLIP reads 77 tokens (begin, 75 text tokens, end). A1111 does not cut a longer prompt: it
splits the tokens into chunks of 75, wraps and pads each chunk to 77, encodes the chunks
separately and concatenates the embeddings along the sequence axis (the UNet's
cross-attention accepts any context length). It breaks a chunk early at a comma found among
its last 20 tokens, so phrases stay whole. The negative prompt is padded with empty chunks to
the same count, so both halves of a CFG batch have one shape.

A prompt of up to 75 tokens gives exactly diffusers' tokenisation (padding="max_length",
truncation=True), which the parity test relies on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

CHUNK_TEXT_TOKENS = 75
COMMA_BACKTRACK = 20


class PromptTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.comma = tokenizer.convert_tokens_to_ids(",</w>")

    def text_tokens(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids

    def chunks(self, prompt: str) -> list[tuple[int, ...]]:
        """Token ids of each 77-token chunk of the prompt (at least one)."""
        tokens = self.text_tokens(prompt)
        pieces: list[list[int]] = []
        current: list[int] = []
        for token in tokens:
            if len(current) == CHUNK_TEXT_TOKENS:
                split = self._comma_split(current)
                pieces.append(current[:split])
                current = current[split:]
            current.append(token)
        pieces.append(current)
        return [self._wrap(p) for p in pieces]

    def _comma_split(self, chunk: list[int]) -> int:
        for i in range(len(chunk) - 1, max(len(chunk) - 1 - COMMA_BACKTRACK, -1), -1):
            if chunk[i] == self.comma:
                return i + 1
        return len(chunk)

    def _wrap(self, text_ids: list[int]) -> tuple[int, ...]:
        return tuple([self.bos, *text_ids, self.eos] + [self.pad] * (CHUNK_TEXT_TOKENS - len(text_ids)))

    def pair(self, prompt: str, negative_prompt: str) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """Chunks of the prompt and of the negative prompt, padded to the same count."""
        pos, neg = self.chunks(prompt), self.chunks(negative_prompt)
        empty = self._wrap([])
        while len(pos) < len(neg):
            pos.append(empty)
        while len(neg) < len(pos):
            neg.append(empty)
        return pos, neg


class EmbeddingCache:
    """Chunk embeddings keyed by (token ids, adapter set): the text encoder runs once per new chunk.

    Bounded by entry count; one SD1.5 chunk embedding is 77 x 768 floats (236 KB).
    """

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def encode(
        self,
        chunk_lists: list[list[tuple[int, ...]]],
        adapter_key: tuple,
        run_text_encoder: Callable[[torch.Tensor], torch.Tensor],
    ) -> list[torch.Tensor]:
        """Embed each list of chunks into one (1, 77*k, dim) tensor; encoder runs batched on misses."""
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
        if missing:
            hidden = run_text_encoder(torch.tensor(missing, dtype=torch.long))
            fresh = {chunk: hidden[i : i + 1] for i, chunk in enumerate(missing)}
            for chunk, emb in fresh.items():
                self._entries[(chunk, adapter_key)] = emb
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        result = []
        for chunks in chunk_lists:
            parts = [fresh[c] if c in fresh else self._entries[(c, adapter_key)] for c in chunks]
            result.append(torch.cat(parts, dim=1))
        return result

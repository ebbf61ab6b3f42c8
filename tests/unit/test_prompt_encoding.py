"""A1111's long-prompt chunks, against the real CLIP tokenizer of the embedded model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPTokenizer

from impasto.core.prompt_encoding import EmbeddingCache, PromptTokenizer
from impasto.models import default_model_path


@pytest.fixture(scope="module")
def tok():
    return PromptTokenizer(CLIPTokenizer.from_pretrained(default_model_path() / "tokenizer"))


def test_short_prompt_is_exactly_diffusers_tokenisation(tok):
    prompt = "a red circle on a white background"
    expected = tok.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert tok.chunks(prompt) == [tuple(expected)]


def test_long_prompt_becomes_chunks_of_75_and_nothing_is_cut(tok):
    words = " ".join(f"w{i}" for i in range(120))
    text_tokens = tok.text_tokens(words)
    chunks = tok.chunks(words)
    assert len(text_tokens) > 150 and len(chunks) == math.ceil(len(text_tokens) / 75)  # no commas: plain 75s
    assert all(len(c) == 77 and c[0] == tok.bos for c in chunks)
    recovered = [t for c in chunks for t in c[1:] if t not in (tok.eos, tok.pad)]
    assert recovered == text_tokens


def test_chunks_break_at_a_late_comma(tok):
    head = " ".join(["red"] * 70) + ", " + " ".join(["blue"] * 10)
    chunks = tok.chunks(head)
    first = [t for t in chunks[0][1:] if t not in (tok.eos, tok.pad)]
    assert first[-1] == tok.comma and len(first) == 71  # the phrase after the comma moved whole


def test_negative_is_padded_to_the_same_chunk_count(tok):
    pos, neg = tok.pair(" ".join(["red"] * 100), "blue")
    assert len(pos) == len(neg) == 2
    assert neg[1] == tok.chunks("")[0]


def test_embedding_cache_runs_the_encoder_only_on_new_chunks():
    calls = []

    def encoder(ids):
        calls.append(ids.shape[0])
        return ids.float().unsqueeze(-1).expand(-1, -1, 4)

    cache = EmbeddingCache(max_entries=8)
    a, b = (1,) * 77, (2,) * 77
    first = cache.encode([[a], [b, a]], ("m",), encoder)
    assert calls == [2] and first[1].shape == (1, 154, 4)
    second = cache.encode([[b, a]], ("m",), encoder)
    assert calls == [2] and torch.equal(second[0], first[1])  # all hits
    cache.encode([[a]], ("m", "lora-x"), encoder)  # another adapter set is another key
    assert calls == [2, 1]
    assert cache.hits == 3 and cache.misses == 3

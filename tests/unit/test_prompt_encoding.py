"""A1111's long-prompt chunks, against the real CLIP tokenizer of the embedded model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPTokenizer

from impasto.core.prompt_encoding import CHUNK_TEXT_TOKENS, EmbeddingCache, InjectedVector, PromptEmbedding, PromptTokenizer, encoder_inputs
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

    def encoder(inputs):
        ids = inputs["input_ids"]
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


# --- textual-inversion tokens -------------------------------------------------------------------


def embedding(token: str, n: int, source: str = "adapter-1", dim: int = 32) -> PromptEmbedding:
    return PromptEmbedding(token, source, torch.arange(n * dim, dtype=torch.float32).view(n, dim))


def slots(chunk) -> list[tuple[int, str, int]]:
    return [(i, p.token, p.index) for i, p in enumerate(chunk) if isinstance(p, InjectedVector)]


def test_a_token_takes_one_position_per_vector_like_diffusers_added_tokens(tok):
    """diffusers' load_textual_inversion adds `<ti>`, `<ti>_1`, `<ti>_2` and rewrites the prompt;
    our chunk has the same ids around the token, and the vectors in the added tokens' places."""
    from transformers import CLIPTokenizer

    prompt = "a <ti> circle, on a <ti>"
    (chunk,) = tok.chunks(prompt, {"<ti>": embedding("<ti>", 3)})
    reference = CLIPTokenizer.from_pretrained(default_model_path() / "tokenizer")
    reference.add_tokens(["<ti>", "<ti>_1", "<ti>_2"])
    expected = reference(prompt.replace("<ti>", "<ti> <ti>_1 <ti>_2"), padding="max_length", max_length=77).input_ids
    added = set(reference.convert_tokens_to_ids(["<ti>", "<ti>_1", "<ti>_2"]))
    assert [p if isinstance(p, int) else "v" for p in chunk] == ["v" if t in added else t for t in expected]
    assert slots(chunk) == [(2, "<ti>", 0), (3, "<ti>", 1), (4, "<ti>", 2), (9, "<ti>", 0), (10, "<ti>", 1), (11, "<ti>", 2)]


def test_tokens_match_case_insensitively_and_word_tokens_only_as_whole_words(tok):
    e = {"<ti>": embedding("<ti>", 1), "shiny": embedding("shiny", 1, "adapter-2")}
    assert [s[1] for s in slots(tok.chunks("A <TI> and a<ti>b", e)[0])] == ["<ti>", "<ti>"]  # brackets: anywhere, as diffusers
    assert [s[1] for s in slots(tok.chunks("Shiny things", e)[0])] == ["shiny"]
    assert slots(tok.chunks("shinyness unshiny shiny_x", e)[0]) == []  # A1111: names match as words


def test_without_the_adapter_a_token_is_just_words(tok):
    prompt = "a <ti> circle"
    assert tok.chunks(prompt, {}) == tok.chunks(prompt) == tok.chunks(prompt, {"<other>": embedding("<other>", 2)})
    assert not slots(tok.chunks(prompt)[0])


def test_the_longest_token_wins(tok):
    e = {"<ti>": embedding("<ti>", 1, "a"), "<ti>-big": embedding("<ti>-big", 2, "b")}
    assert [(s[1], s[2]) for s in slots(tok.chunks("<ti>-big <ti>", e)[0])] == [("<ti>-big", 0), ("<ti>-big", 1), ("<ti>", 0)]


def test_an_embedding_is_never_split_between_chunks(tok):
    words = " ".join(["red"] * 73)
    chunks = tok.chunks(f"{words} <ti> blue", {"<ti>": embedding("<ti>", 4)})
    assert len(chunks) == 2 and not slots(chunks[0])
    first = [t for t in chunks[0][1:] if t not in (tok.eos, tok.pad)]
    assert len(first) == 73  # the chunk closed early rather than cut the 4 vectors
    assert [s[0] for s in slots(chunks[1])] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="a chunk holds 75"):
        tok.chunks("<huge>", {"<huge>": embedding("<huge>", CHUNK_TEXT_TOKENS + 1)})


def test_negative_prompt_uses_the_same_tokens(tok):
    pos, neg = tok.pair("a circle", "<bad>", {"<bad>": embedding("<bad>", 2)})
    assert not slots(pos[0]) and [s[0] for s in slots(neg[0])] == [1, 2]


def test_injected_chunks_are_their_own_cache_entries_and_run_apart():
    """A chunk with vectors never equals the plain chunk with the same ids, and the plain chunks
    of a call go to the encoder without vectors (so a compiled engine can still take them)."""
    e = embedding("<ti>", 1)
    plain = (1, 5, 2) + (2,) * 74
    injected = (1, *e.positions(), 2) + (2,) * 74
    other_source = (1, *embedding("<ti>", 1, "adapter-9").positions(), 2) + (2,) * 74
    assert injected != plain and injected != other_source and hash(injected) != hash(plain)
    inputs = encoder_inputs([injected])
    assert inputs["input_ids"][0, 1] == 0 and inputs["token_vector_mask"][0].nonzero().flatten().tolist() == [1]
    assert torch.equal(inputs["token_vectors"][0, 1], e.vectors[0])
    seen = []

    def encoder(inputs):
        seen.append(sorted(inputs))
        return inputs["input_ids"].float().unsqueeze(-1).expand(-1, -1, 4)

    cache = EmbeddingCache()
    cache.encode([[plain], [injected], [other_source]], ("m",), encoder)
    assert seen == [["input_ids"], ["input_ids", "token_vector_mask", "token_vectors"]]
    assert cache.misses == 3
    cache.encode([[injected]], ("m",), encoder)
    assert cache.hits == 1 and len(seen) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_text_encoder_reads_injected_vectors_as_token_table_rows(tok, dtype):
    """The torch engine's hook replaces exactly the masked rows: vectors equal to the rows of
    "blue square" give the encoder output of the words themselves, in the engine's dtype."""
    from transformers import CLIPTextModel

    from impasto.backends.torch_backend import TorchTextEncoder

    engine = TorchTextEncoder(CLIPTextModel.from_pretrained(default_model_path() / "text_encoder"), dtype=dtype)
    table = engine.module.get_input_embeddings().weight.detach().float()
    ids = tok.text_tokens("blue square")
    e = PromptEmbedding("<bs>", "a", table[ids].clone())
    words = engine.run(encoder_inputs(tok.chunks("a blue square, a red circle")))["last_hidden_state"]
    injected = engine.run(encoder_inputs(tok.chunks("a <bs>, a red circle", {"<bs>": e})))["last_hidden_state"]
    assert torch.equal(injected, words)
    assert not torch.equal(engine.run(encoder_inputs(tok.chunks("a <bs>, a red circle")))["last_hidden_state"], words)

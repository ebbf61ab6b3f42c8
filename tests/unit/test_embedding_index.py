"""The token index behind A1111's embeddings by name, and how the infotext lists adapters."""

from __future__ import annotations

from impasto.core.adapter_registry import AdapterRecord
from impasto.core.adapter_weights import ActiveAdapter, RequestAdapters
from impasto.core.embedding_index import EmbeddingTokenIndex


def record(name: str, tokens=(), num_targets: int = 0) -> AdapterRecord:
    return AdapterRecord(
        id=name * 8, name=name, format="embedding" if not num_targets else "kohya", ranks=(), num_targets=num_targets,
        size_bytes=1, sha256="a" * 64, has_embeddings=bool(tokens), model="tiny", components=("text_encoder",),
        tokens=tuple((t, 1) for t in tokens), whole_file_sha256="b" * 64,
    )


def test_finds_whole_words_case_insensitively_in_order_of_appearance():
    red, toy = record("red", ["redthing"]), record("toy", ["<cat-toy>"])
    index = EmbeddingTokenIndex([red, toy, record("lora", ["<s1>"], num_targets=3)])
    assert index.written_in("a <CAT-TOY>x and a RedThing") == {"<cat-toy>": (toy,), "redthing": (red,)}
    assert index.written_in("redthings, xredthing, redthing_2") == {}, "a word token matches only as a whole word"
    assert index.written_in("a <s1>") == {}, "a LoRA's bundled tokens are not indexed"
    assert EmbeddingTokenIndex().written_in("anything") == {}


def test_one_token_of_two_adapters_lists_both():
    a, b = record("b-first", ["<x>"]), record("a-second", ["<X>"])
    assert EmbeddingTokenIndex([a, b]).written_in("<x>") == {"<x>": (b, a)}


def test_infotext_lists_loras_and_the_embeddings_used_apart():
    lora, used, unused = record("lora", ["<s1>"], num_targets=3), record("used", ["u"]), record("unused", ["n"])
    items = tuple(ActiveAdapter(r, r.name, 1.0, None, None, None) for r in (lora, used, unused))
    adapters = RequestAdapters(items, used_embeddings=frozenset({used.id, lora.id}))
    assert adapters.infotext() == {"Lora hashes": "lora: aaaaaaaaaaaa", "TI hashes": "used: bbbbbbbbbbbb"}
    assert RequestAdapters(items[2:]).infotext() == {}

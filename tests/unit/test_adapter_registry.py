"""The adapter registry: checked uploads, atomic storage by content hash, names, rescan on start."""

from __future__ import annotations

import json

import pytest
from lora_fixtures import bundle, single_torch_thread  # noqa: F401 (fixture)

from impasto.core.adapter_registry import AdapterRegistry
from impasto.core.errors import AlreadyExists, InvalidArgument, NotFound
from impasto.lora import addnet_hash


def upload(registry: AdapterRegistry, source, name: str, **kw):
    tmp = registry.new_upload_path()
    tmp.write_bytes(source.read_bytes())
    return registry.add(tmp, name=name, format=kw.get("format"), model="tiny", named_weight_shapes=bundle().named_weight_shapes())


@pytest.fixture()
def kohya_file(tmp_path):
    return bundle().write_kohya(tmp_path / "k.safetensors")


def test_store_list_resolve_and_rescan(tmp_path, kohya_file):
    root = tmp_path / "adapters"
    registry = AdapterRegistry(root)
    assert not root.exists(), "nothing is written before the first upload"
    record, existed = upload(registry, kohya_file, "ink")
    assert not existed and record.format == "kohya" and record.sha256 == addnet_hash(kohya_file)
    assert sorted(p.name for p in root.iterdir()) == [f"{record.id}.json", f"{record.id}.safetensors"]
    assert json.loads((root / f"{record.id}.json").read_text())["name"] == "ink"
    assert registry.resolve("ink") == registry.resolve(record.id) == registry.resolve(record.id[:8]) == record
    with pytest.raises(NotFound, match="unknown adapter 'inc'; known: ink"):
        registry.resolve("inc")
    again = AdapterRegistry(root)  # a restart
    assert again.list() == [record]
    assert set(again.load(record).modules) == set(registry.load(record).modules)
    assert set(again.view(record, "unet").modules) | set(again.view(record, "text_encoder").modules) == set(registry.load(record).modules)


def test_same_content_other_format_is_the_same_adapter(tmp_path, kohya_file):
    registry = AdapterRegistry(tmp_path / "a")
    record, _ = upload(registry, kohya_file, "ink")
    assert upload(registry, kohya_file, "ink") == (record, True)
    with pytest.raises(AlreadyExists, match="already stored as 'ink'"):
        upload(registry, kohya_file, "ink-2")


def test_a_crash_leaves_no_half_adapter(tmp_path, kohya_file):
    root = tmp_path / "a"
    registry = AdapterRegistry(root)
    record, _ = upload(registry, kohya_file, "ink")
    (root / f"{record.id}.json").unlink()  # as if the process died before the record was written
    leftover = registry.new_upload_path()
    assert AdapterRegistry(root).list() == []
    assert not leftover.exists(), "upload leftovers are removed on start"


def test_refusals_consume_the_upload(tmp_path):
    registry = AdapterRegistry(tmp_path / "a")
    tmp = registry.new_upload_path()
    tmp.write_bytes(b"PK\x03\x04 a torch.save zip")
    with pytest.raises(InvalidArgument, match="pickle checkpoints are refused") as info:
        registry.add(tmp, name="x", format=None, model="tiny", named_weight_shapes={})
    assert "upload 'x'" in str(info.value) and not tmp.exists()
    with pytest.raises(InvalidArgument, match="unknown format"):
        registry.check_name("x", "lycoris")


def test_embeddings_are_served_with_their_tokens(tmp_path, kohya_file):
    import torch
    from safetensors.torch import load_file, save_file

    # kohya's pivotal-tuning bundle: the LoRA plus a textual-inversion token.
    sd = load_file(str(kohya_file)) | {"bundle_emb.<s1>.string_to_param.*": torch.randn(2, 32)}
    save_file(sd, str(tmp_path / "bundle.safetensors"))
    save_file({"emb_params": torch.randn(3, 32)}, str(tmp_path / "emb.safetensors"))  # A1111/kohya embedding
    root = tmp_path / "a"
    registry = AdapterRegistry(root)
    pivotal, _ = upload(registry, tmp_path / "bundle.safetensors", "bundle")
    assert pivotal.has_embeddings and pivotal.tokens == (("<s1>", 2),) and pivotal.num_targets > 0
    embedding, _ = upload(registry, tmp_path / "emb.safetensors", "shiny")
    assert embedding.format == "embedding" and embedding.tokens == (("shiny", 3),)  # the name is the token
    assert embedding.num_targets == 0 and embedding.components == ("text_encoder",)
    assert registry.view(embedding, "unet") is None
    view = registry.view(embedding, "text_encoder")
    assert not view.modules and view.embeddings["shiny"]["text_encoder"].shape == (3, 32)
    again = AdapterRegistry(root)  # a restart reads the token from the name again
    assert again.list() == registry.list() and set(again.load(again.resolve("shiny")).embeddings) == {"shiny"}


def test_embeddings_that_cannot_be_served_are_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    registry = AdapterRegistry(tmp_path / "a")
    save_file({"<wide>": torch.randn(2, 768)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(InvalidArgument, match=r"data: .*embedding '<wide>' has vectors of width 768, but the base model's text_encoder hidden size is 32"):
        upload(registry, tmp_path / "wide.safetensors", "wide")
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 64)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(InvalidArgument, match="text encoders the base model lacks: xl -> text_encoder_2"):
        upload(registry, tmp_path / "xl.safetensors", "xl")
    save_file({"<long>": torch.randn(76, 32)}, str(tmp_path / "long.safetensors"))
    with pytest.raises(InvalidArgument, match="76 vectors; a token takes 1 to 75"):
        upload(registry, tmp_path / "long.safetensors", "long")
    assert registry.list() == []


def test_delete(tmp_path, kohya_file):
    root = tmp_path / "a"
    registry = AdapterRegistry(root)
    record, _ = upload(registry, kohya_file, "ink")
    assert registry.delete("ink") == record
    assert list(root.iterdir()) == [] and registry.list() == []
    with pytest.raises(NotFound):
        registry.delete("ink")

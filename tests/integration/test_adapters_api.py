"""AdapterService over gRPC: upload (chunked, validated, size-limited), list, delete, restart."""

from __future__ import annotations

import io

import grpc
import pytest
import torch
from adapter_files import write_diffusers, write_kohya
from conftest import running_server
from safetensors.torch import load_file, save_file

from impasto.lora import addnet_hash, load_adapter
from impasto_client import AlreadyExistsError, ImpastoClient, InvalidArgumentError, NotFoundError
from impasto_client.pb import adapter_service_pb2 as apb
from impasto_client.pb import adapter_service_pb2_grpc as apb_grpc

LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_files")
    return {
        "kohya": write_kohya(root / "k.safetensors", seed=3, text_encoder=True),
        "diffusers": write_diffusers(root / "d", seed=4),
        "root": root,
    }


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def served(adapters_dir):
    with running_server(adapters_dir=adapters_dir, max_adapter_bytes=LIMIT) as server:
        with ImpastoClient(server.target) as client:
            yield server, client


def test_upload_reports_what_the_file_is(served, files):
    _, client = served
    info = client.upload_adapter(files["kohya"], "kohya-one")
    adapter = load_adapter(files["kohya"])
    assert info.id == adapter.content_hash and info.name == "kohya-one"
    assert info.format == apb.ADAPTER_FORMAT_KOHYA
    assert list(info.ranks) == [4] and info.num_targets == len(adapter.modules)
    assert info.size_bytes == files["kohya"].stat().st_size
    assert info.sha256 == addnet_hash(files["kohya"]) and info.short_hash == info.sha256[:12]
    assert not info.has_embeddings and list(info.components) == ["unet", "text_encoder"]
    info_d = client.upload_adapter(files["diffusers"].read_bytes(), "diffusers-one")  # bytes work too
    assert info_d.format == apb.ADAPTER_FORMAT_DIFFUSERS and list(info_d.components) == ["unet"]
    assert {a.name for a in client.list_adapters()} >= {"kohya-one", "diffusers-one"}


def test_same_content_and_taken_names(served, files):
    _, client = served
    with pytest.raises(AlreadyExistsError, match="already stored as 'kohya-one'"):
        client.upload_adapter(files["kohya"], "kohya-other-name")
    same = client.upload_adapter(files["kohya"], "kohya-one")  # idempotent
    assert same.name == "kohya-one"
    other = write_kohya(files["root"] / "k2.safetensors", seed=5)
    with pytest.raises(AlreadyExistsError, match="'kohya-one' is taken"):
        client.upload_adapter(other, "kohya-one")


def test_bad_names_are_refused(served, files):
    _, client = served
    for name in ("", "has space", "a:b", "<x>"):
        with pytest.raises(InvalidArgumentError) as info:
            client.upload_adapter(files["kohya"], name)
        assert info.value.message.startswith("name:"), info.value.message


def test_pickle_and_garbage_are_refused_with_the_reason(served, files):
    _, client = served
    buffer = io.BytesIO()
    torch.save(load_file(str(files["kohya"])), buffer)
    with pytest.raises(InvalidArgumentError, match="pickle checkpoints are refused"):
        client.upload_adapter(buffer.getvalue(), "pickled")
    with pytest.raises(InvalidArgumentError, match="not a readable safetensors file"):
        client.upload_adapter(b"\x00" * 1000, "garbage")
    assert "pickled" not in {a.name for a in client.list_adapters()}


def test_unmatched_keys_and_shape_mismatches_are_named(served, files):
    _, client = served
    sd = load_file(str(files["kohya"]))
    key = next(k for k in sd if k.startswith("lora_unet_") and k.endswith("attn1_to_q.lora_down.weight"))
    prefix = key.removesuffix(".lora_down.weight")
    renamed = {(k.replace(prefix, "lora_unet_no_such_block_to_q") if k.startswith(prefix + ".") else k): v for k, v in sd.items()}
    path = files["root"] / "renamed.safetensors"
    save_file(renamed, str(path))
    with pytest.raises(InvalidArgumentError, match="not in the base model: unet.no.such.block.to.q|no_such_block"):
        client.upload_adapter(path, "renamed")
    reshaped = dict(sd)
    reshaped[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 3)
    save_file(reshaped, str(path))
    with pytest.raises(InvalidArgumentError, match="shape mismatch"):
        client.upload_adapter(path, "reshaped")


def test_size_limit_is_named_before_and_during_the_stream(served):
    server, client = served
    assert client.server_info().limits.max_adapter_bytes == LIMIT
    with pytest.raises(InvalidArgumentError, match="max_adapter_bytes"):
        client.upload_adapter(b"\x00" * (LIMIT + 1), "too-big")
    # A client that does not declare the size is stopped when the bytes pass the limit.
    def stream():
        yield apb.UploadAdapterRequest(header=apb.UploadAdapterHeader(name="too-big-stream"))
        for _ in range(3):
            yield apb.UploadAdapterRequest(chunk=b"\x00" * (LIMIT // 2 + 1))

    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            apb_grpc.AdapterServiceStub(channel).UploadAdapter(stream(), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_adapter_bytes" in info.value.details()
    assert not list(server.engine.adapters.root.glob(".upload-*")), "no temporary file is left behind"


def test_delete_then_generate_is_refused(served, files):
    _, client = served
    info = next(a for a in client.list_adapters() if a.name == "diffusers-one")
    gone = client.delete_adapter(info.name)
    assert gone.id == info.id and info.name not in {a.name for a in client.list_adapters()}
    with pytest.raises(InvalidArgumentError, match="unknown adapter"):
        list(client.generate("a circle", num_steps=2, adapters=[(info.name, 1.0)]))
    with pytest.raises(NotFoundError):
        client.delete_adapter(info.name)
    assert client.upload_adapter(files["diffusers"], info.name).id == info.id  # back for the next test


def test_adapters_survive_a_restart(served, adapters_dir):
    _, client = served
    before = {(a.id, a.name, a.sha256) for a in client.list_adapters()}
    assert before
    with running_server(adapters_dir=adapters_dir) as again:
        with ImpastoClient(again.target) as c2:
            assert {(a.id, a.name, a.sha256) for a in c2.list_adapters()} == before
            name = sorted(before)[0][1]
            assert sum(1 for e in c2.generate("a circle", num_steps=2, seed=1, adapters=[(name, 0.5)]) if type(e).__name__ == "Image") == 1

"""Runtime LoRA branches with a per-sample adapter index (lora/multi_lora.py) against merged weights.

Not bit-exact: merged weights compute (W + ΔW)·x, the branches W·x + B·(A·x), and the fp32 sums
round differently; hence atol 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lora_fixtures import Bundle, apply, single_torch_thread  # noqa: F401 (fixture)

from impasto.lora import CanonicalAdapter, compose, load_adapter, named_weight_shapes_of
from impasto.lora.multi_lora import MultiLora, cfg_indices


def unet_view(adapter: CanonicalAdapter) -> CanonicalAdapter:
    return CanonicalAdapter(modules={t: m for t, m in adapter.modules.items() if t.startswith("unet.")})


def two_adapters(tmp_path):
    """Two adapters on one base UNet, of different ranks (so padding to r_max is exercised):
    peft LoRAs on attention, feed-forward, 1x1 / 3x3 convs and the time embedding."""
    first = Bundle(0)
    second = Bundle(0, unet_kw={"r": 6, "lora_alpha": 3, "rank_pattern": {}, "alpha_pattern": {}})
    a = unet_view(load_adapter(first.write_diffusers(tmp_path / "a")))
    b = unet_view(load_adapter(second.write_diffusers(tmp_path / "b")))
    return first.unet, a, b


def merged_unet(unet, adapter: CanonicalAdapter, weight: float = 1.0):
    shapes = named_weight_shapes_of({"unet": unet})
    deltas = compose([(adapter, weight)], named_weight_shapes=shapes)
    base = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    merged = copy.deepcopy(unet)
    merged.load_state_dict({k.removeprefix("unet."): v for k, v in apply(base, deltas).items()})
    return merged


def unet_inputs(batch: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, 77, 32, generator=g))


def run(unet, inputs):
    with torch.inference_mode():
        return unet(*inputs[:2], encoder_hidden_states=inputs[2], return_dict=False)[0]


def test_mixed_batch_matches_each_adapter_merged(tmp_path):
    unet, a, b = two_adapters(tmp_path)
    per_request = [0, 1, -1]  # A, B, none
    samples = cfg_indices(per_request)
    inputs = unet_inputs(len(samples))
    weights = [1.0, 0.7]
    references = {0: run(merged_unet(unet, a, weights[0]), inputs), 1: run(merged_unet(unet, b, weights[1]), inputs),
                  -1: run(unet, inputs)}

    multi = MultiLora(unet, [a, b], weights)
    assert len(multi.branches) == len(a.modules)
    multi.set_requests(per_request)
    mixed = run(unet, inputs)
    for i, index in enumerate(samples):
        torch.testing.assert_close(mixed[i], references[index][i], atol=1e-5, rtol=1e-5, msg=f"sample {i}, adapter {index}")
    # The adapters really change the output (else the comparison above proves nothing).
    assert (references[0] - references[-1]).abs().max() > 1e-3
    assert (references[1] - references[0]).abs().max() > 1e-3

    multi.clear()
    assert torch.equal(run(unet, inputs), references[-1])  # branches off: the base, bit for bit
    multi.remove()
    multi.set_requests(per_request)
    assert torch.equal(run(unet, inputs), references[-1])  # hooks gone


def test_parameter_names_are_unchanged(tmp_path):
    unet, a, b = two_adapters(tmp_path)
    names = [n for n, _ in unet.named_parameters()]
    MultiLora(unet, [a, b])
    assert [n for n, _ in unet.named_parameters()] == names  # an engine's refit by name still works


def test_indices_are_checked(tmp_path):
    unet, a, b = two_adapters(tmp_path)
    multi = MultiLora(unet, [a, b])
    with pytest.raises(ValueError, match="outside -1..1"):
        multi.set_requests([0, 2])
    multi.set_requests([0, 1])  # 4 samples
    with pytest.raises(ValueError, match="4 adapter indices for a batch of 2"):
        run(unet, unet_inputs(2))

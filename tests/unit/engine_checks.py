"""Checks every compiled backend must pass against the torch engines; used by test_*_backend.py."""

from __future__ import annotations

import functools

import pytest
import torch

from impasto.backends.base import ModelEngines
from impasto.compiler.parity import ImageRequest, generate, psnr
from tiny_sd_model import PROFILE_SIZE, VAE_SCALE, empty_prompt_ids, tiny_model_dir, token_ids, torch_engines

VAE_SCALING = 0.18215
# Weights a LoRA would touch (attention, feed-forward, a conv for LoCon) plus a norm and a bias.
UNET_REFIT_NAMES = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight",
    "up_blocks.0.attentions.1.proj_in.weight",
    "down_blocks.0.resnets.0.conv1.weight",
    "mid_block.resnets.0.norm1.weight",
    "conv_out.bias",
)


def unet_inputs(seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latent = PROFILE_SIZE // VAE_SCALE
    return {
        "sample": torch.randn((batch, 4, latent, latent), generator=generator),
        "timestep": torch.tensor([500.0, 20.0][:batch]),
        "encoder_hidden_states": torch.randn((batch, 77, 32), generator=generator),
    }


def weight_set(seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Full weights (base + a delta) for the refit names, as a LoRA merge would produce."""
    base = torch_engines().unet.named_weights()
    generator = torch.Generator().manual_seed(seed)
    return {name: base[name] + scale * torch.randn(base[name].shape, generator=generator) for name in UNET_REFIT_NAMES}


def request(num_steps: int = 3) -> ImageRequest:
    return ImageRequest(token_ids(1), empty_prompt_ids(), PROFILE_SIZE, PROFILE_SIZE, num_steps, vae_scale=VAE_SCALE)


def check_components_close(engines: ModelEngines, atol: float) -> None:
    reference = torch_engines()
    inputs = unet_inputs()
    got = engines.unet.run(inputs)["noise_pred"]
    want = reference.unet.run(inputs)["noise_pred"]
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=atol, rtol=0), (got - want).abs().max()

    ids = torch.cat([empty_prompt_ids(), token_ids(3)])
    got = engines.text_encoder.run({"input_ids": ids})["last_hidden_state"]
    want = reference.text_encoder.run({"input_ids": ids})["last_hidden_state"]
    assert torch.allclose(got, want, atol=atol, rtol=0), (got - want).abs().max()

    latent = torch.randn((1, 4, PROFILE_SIZE // VAE_SCALE, PROFILE_SIZE // VAE_SCALE), generator=torch.Generator().manual_seed(5))
    got = engines.vae_decoder.run({"latent": latent})["image"]
    want = reference.vae_decoder.run({"latent": latent})["image"]
    assert torch.allclose(got, want, atol=atol, rtol=0), (got - want).abs().max()

    if engines.vae_encoder is not None:
        image = torch.rand((1, 3, PROFILE_SIZE, PROFILE_SIZE), generator=torch.Generator().manual_seed(6)) * 2 - 1
        got = engines.vae_encoder.run({"image": image})["latent_mean"]
        want = reference.vae_encoder.run({"image": image})["latent_mean"]
        assert torch.allclose(got, want, atol=atol, rtol=0), (got - want).abs().max()


@functools.cache
def torch_image() -> torch.Tensor:
    return generate(torch_engines(), request(), tiny_model_dir(), VAE_SCALING)


def end_to_end_psnr(engines: ModelEngines) -> float:
    want = torch_image()
    got = generate(engines, request(), tiny_model_dir(), VAE_SCALING)
    return psnr(got, want)


def check_refit_exact(engines: ModelEngines) -> None:
    """Refit A, B, A gives A bit for bit; restore gives the base bit for bit; B matches torch's B."""
    unet = engines.unet
    inputs = unet_inputs(seed=1)
    base = unet.run(inputs)["noise_pred"]
    weights_a, weights_b = weight_set(1), weight_set(2)
    unet.refit(weights_a)
    out_a = unet.run(inputs)["noise_pred"]
    unet.refit(weights_b)
    out_b = unet.run(inputs)["noise_pred"]
    unet.refit(weights_a)
    out_a_again = unet.run(inputs)["noise_pred"]
    unet.restore()
    restored = unet.run(inputs)["noise_pred"]

    assert not torch.equal(out_a, base) and not torch.equal(out_a, out_b), "refit changed nothing"
    assert torch.equal(out_a_again, out_a), "refit A, B, A is not A"
    assert torch.equal(restored, base), "restore is not the base"

    # The router's switch: restore() then refit() of a set that touches only some of A's
    # weights (engines may restore lazily, skipping what the refit overwrites): the others
    # must be back to base, bit for bit, as after a restore that ran before the refit.
    half_b = dict(list(weights_b.items())[::2])
    assert 0 < len(half_b) < len(weights_b)
    unet.refit(weights_a)
    unet.restore()
    unet.refit(half_b)
    switched = unet.run(inputs)["noise_pred"]
    unet.restore()
    assert torch.equal(unet.run(inputs)["noise_pred"], base), "restore after a partial set is not the base"
    unet.refit(half_b)
    direct = unet.run(inputs)["noise_pred"]
    unet.restore()
    assert torch.equal(switched, direct), "restore + refit of a smaller set kept some of the old set's weights"

    reference = torch_engines().unet
    try:
        reference.refit(weights_b)
        want_b = reference.run(inputs)["noise_pred"]
    finally:
        reference.restore()
    assert torch.allclose(out_b, want_b, atol=1e-4, rtol=0), (out_b - want_b).abs().max()


def check_refit_reaches_every_weight(engines: ModelEngines) -> None:
    """Refit every UNet weight at once; the engine must then match torch with the same weights.

    Catches a runtime that keeps a private copy of some weight (a folded or repacked constant).
    """
    base = torch_engines().unet.named_weights()
    generator = torch.Generator().manual_seed(7)
    weights = {name: w * (1 + 0.05 * torch.randn(w.shape, generator=generator)) for name, w in base.items()}
    inputs = unet_inputs(seed=3)
    reference = torch_engines().unet
    try:
        reference.refit(weights)
        want = reference.run(inputs)["noise_pred"]
    finally:
        reference.restore()
    engines.unet.refit(weights)
    try:
        got = engines.unet.run(inputs)["noise_pred"]
    finally:
        engines.unet.restore()
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def check_refit_errors(engines: ModelEngines) -> None:
    unet = engines.unet
    inputs = unet_inputs(seed=2)
    before = unet.run(inputs)["noise_pred"]
    good = weight_set(3)
    with pytest.raises(KeyError, match="no_such_block.weight"):
        unet.refit({**good, "no_such_block.weight": torch.zeros(3)})
    name = UNET_REFIT_NAMES[0]
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        unet.refit({**good, name: torch.zeros(3, 3)})
    # a rejected refit changed nothing
    assert torch.equal(unet.run(inputs)["noise_pred"], before)

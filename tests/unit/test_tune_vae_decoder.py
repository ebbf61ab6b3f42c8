"""models/tune_vae_decoder.py, a few steps on the shipped model: it must change the decoder only
(the UNet was trained in the encoder's latent space) and write its folder atomically."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from diffusers import AutoencoderKL

from impasto.models import default_model_path


def test_tunes_the_decoder_only_and_writes_atomically(tmp_path):
    out = tmp_path / "new" / "vae"  # a parent that does not exist yet
    args = ["--steps", "2", "--batch", "4", "--num-images", "16", "--distill-latents", "4", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "impasto.models.tune_vae_decoder", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "before:" in done.stdout and "after:" in done.stdout
    before = AutoencoderKL.from_pretrained(default_model_path() / "vae").state_dict()
    after = AutoencoderKL.from_pretrained(out).state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert [p.name for p in out.parent.iterdir()] == ["vae"]  # no temporary folder left beside it

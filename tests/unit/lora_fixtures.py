"""Shared fixtures for the test_lora_* modules: tiny SD components and real adapter files.

The adapter files are written by diffusers' and peft's own code: peft `LoraConfig` injected with
`get_peft_model` (lora_B randomised: `init_lora_weights=False`, as peft zero-inits it otherwise),
saved with `StableDiffusionPipeline.save_lora_weights`, `PeftModel.save_pretrained`, and converted
to kohya with `convert_state_dict_to_kohya`. No key names are written by hand, except for
cloneofsimo files (no installed library writes them; built from the format's description in
lora/formats/cloneofsimo.py).

The reference delta of every module is peft's own `get_delta_weight`.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore")

from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj", "conv_shortcut"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(autouse=True)
def single_torch_thread():
    """The tests' matrices are tiny; on a shared, loaded CPU torch's thread pool costs ~100× more
    in synchronisation than it saves. Scoped to the tests of modules that import this fixture."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_unet(seed: int = 0, layers_per_block: int = 2) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=layers_per_block, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    ).eval()


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
                            num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000)
    return CLIPTextModel(config).eval()


def unet_config(**kw) -> LoraConfig:
    base = dict(r=4, lora_alpha=8, target_modules=UNET_TARGETS, rank_pattern={"to_k": 2}, alpha_pattern={"ff.net.2": 3},
                init_lora_weights=False)
    return LoraConfig(**{**base, **kw})


def te_config(**kw) -> LoraConfig:
    return LoraConfig(**{**dict(r=2, lora_alpha=6, target_modules=TE_TARGETS, init_lora_weights=False), **kw})


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """{base weight name: peft's delta} for every LoRA layer of a peft-injected model."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            name = name.removeprefix("base_model.model.")
            total = sum(module.get_delta_weight(a) for a in module.active_adapters)
            out[f"{name}.weight"] = total.detach()
    return out


class Bundle:
    """Base components, their peft-adapted copies and the reference deltas."""

    def __init__(self, seed: int = 0, unet_kw=None, te_kw=None, layers_per_block: int = 2):
        self.unet = tiny_unet(seed, layers_per_block)
        self.te = tiny_text_encoder(seed + 1)
        self.unet_config = unet_config(**(unet_kw or {}))
        self.te_config = te_config(**(te_kw or {}))
        torch.manual_seed(seed + 2)
        self.peft_unet = get_peft_model(copy.deepcopy(self.unet), self.unet_config)
        self.peft_te = get_peft_model(copy.deepcopy(self.te), self.te_config)
        # Reference deltas keyed like the base model's own parameters, component-prefixed.
        self.deltas = {f"unet.{k}": v for k, v in peft_deltas(self.peft_unet).items()}
        self.deltas.update({f"text_encoder.{k}": v for k, v in peft_deltas(self.peft_te).items()})

    def unet_lora_sd(self):
        return {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(self.peft_unet).items()}

    def te_lora_sd(self):
        return {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(self.peft_te).items()}

    def named_weight_shapes(self):
        from impasto.lora import named_weight_shapes_of

        return named_weight_shapes_of({"unet": self.unet, "text_encoder": self.te})

    def base_weights(self):
        out = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        out.update({f"text_encoder.{k}": v for k, v in self.te.state_dict().items()})
        return out

    # ---- files written by the libraries' own code ----

    def write_diffusers(self, folder: Path) -> Path:
        StableDiffusionPipeline.save_lora_weights(
            str(folder), unet_lora_layers=self.unet_lora_sd(), text_encoder_lora_layers=self.te_lora_sd(),
            unet_lora_adapter_metadata=self.peft_unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=self.peft_te.peft_config["default"].to_dict(),
        )
        return Path(folder) / "pytorch_lora_weights.safetensors"

    def write_peft_folder(self, folder: Path, which: str = "unet") -> Path:
        (self.peft_unet if which == "unet" else self.peft_te).save_pretrained(str(folder))
        return Path(folder)

    def write_kohya(self, path: Path) -> Path:
        """diffusers' kohya converter writes alpha = rank, so the peft scale is folded into
        lora_B first (as its training scripts do for lora_alpha == r, where it is 1)."""
        sd = {}
        for component, model, lora_sd in (("unet", self.peft_unet, self.unet_lora_sd()), ("text_encoder", self.peft_te, self.te_lora_sd())):
            scaling = {n.removeprefix("base_model.model."): m.scaling["default"] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
            for k, v in lora_sd.items():
                if k.endswith(".lora_B.weight"):
                    v = v * scaling[k.removesuffix(".lora_B.weight")]
                sd[f"{component}.{k}"] = v
        save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(sd).items()}, str(path))
        return Path(path)

    def write_cloneofsimo(self, path: Path, token_vec: torch.Tensor | None = None) -> tuple[Path, dict]:
        """Following the cloneofsimo spec: walk ancestors of the target classes, index Linear/Conv2d
        descendants, `up` pre-multiplied by the scale. Returns the path and the reference deltas of
        just those modules."""
        files, meta, ref = {}, {}, {}
        for model_name, peft_model, base, classes in (
            ("unet", self.peft_unet, self.unet, ["Attention", "GEGLU"]),
            ("text_encoder", self.peft_te, self.te, ["CLIPAttention"]),
        ):
            name_of = {id(m): n for n, m in base.named_modules()}
            layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
            order = []
            for ancestor in base.modules():
                if type(ancestor).__name__ in classes:
                    for _, m in ancestor.named_modules():
                        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                            order.append(name_of[id(m)])
            meta[model_name] = json.dumps(classes)
            for i, n in enumerate(order):
                layer = layers[n]
                files[f"{model_name}:{i}:up"] = (layer.lora_B["default"].weight * layer.scaling["default"]).detach().contiguous()
                files[f"{model_name}:{i}:down"] = layer.lora_A["default"].weight.detach().contiguous()
                meta[f"{model_name}:{i}:rank"] = str(layer.r["default"])
                ref[f"{model_name}.{n}.weight"] = self.deltas[f"{model_name}.{n}.weight"]
        if token_vec is not None:
            files["<s1>"] = token_vec
            meta["<s1>"] = "<embed>"
        save_file(files, str(path), metadata=meta)
        return Path(path), ref


def to_sgm_name(name: str, layers_per_block: int = 2) -> str:
    """A kohya module name in diffusers block numbering -> SGM (input/middle/output) numbering
    (SDXL kohya files), by the SGM rule
    (input block = 1 + block·(layers+1) + layer; inner index 0 resnets, 1 attentions)."""
    m = re.match(r"lora_unet_down_blocks_(\d+)_(resnets|attentions)_(\d+)_(.*)", name)
    if m:
        i = 1 + int(m[1]) * (layers_per_block + 1) + int(m[3])
        return f"lora_unet_input_blocks_{i}_{0 if m[2] == 'resnets' else 1}_{m[4]}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(resnets|attentions)_(\d+)_(.*)", name)
    if m:
        i = int(m[1]) * (layers_per_block + 1) + int(m[3])
        return f"lora_unet_output_blocks_{i}_{0 if m[2] == 'resnets' else 1}_{m[4]}"
    m = re.match(r"lora_unet_mid_block_(resnets|attentions)_(\d+)_(.*)", name)
    if m:
        i = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m[1], m[2])]
        return f"lora_unet_middle_block_{i}_{m[3]}"
    return name


@lru_cache(maxsize=4)
def bundle(seed: int = 0) -> Bundle:
    return Bundle(seed)


def apply(base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(base)
    for k, d in deltas.items():
        out[k] = base[k] + d.reshape(base[k].shape)
    return out


def assert_deltas_close(got: dict, want: dict, atol=1e-5, rtol=1e-5):
    assert sorted(got) == sorted(want), f"keys differ: only got {sorted(set(got) - set(want))[:5]}, only want {sorted(set(want) - set(got))[:5]}"
    for k in want:
        torch.testing.assert_close(got[k].float().reshape(want[k].shape), want[k].float(), atol=atol, rtol=rtol, msg=k)

"""A trained adapter written in every form a user may want, beside its job.

- `kohya`: one A1111/kohya safetensors file; textual-inversion vectors bundled
  (`bundle_emb.<token>.string_to_param.*`), so a pivotal-tuning result stays one file. A
  textual inversion alone is A1111's embedding file (`{"emb_params": vectors}`), which holds no
  token: A1111 names it after the file (`<name>.safetensors`), see impasto.lora.export;
- `diffusers`: the PEFT-style file `load_lora_weights` reads (LoRA modules only);
- `embeddings`: `{token: tensor[num_vectors, dim]}`, the file `load_textual_inversion` reads;
- `peft_unet` / `peft_text_encoder`: a PEFT adapter folder per component, zipped so it travels
  as one file (`PeftModel.from_pretrained` reads the unzipped folder).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from impasto.lora import CanonicalAdapter, export_diffusers, export_kohya, export_peft_folder
from impasto.lora.files import write_safetensors


def write_outputs(adapter: CanonicalAdapter, folder: Path, name: str, metadata: dict[str, str] | None = None) -> dict[str, Path]:
    """{output name: file}; every file is written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {"kohya": export_kohya(adapter, folder / f"{name}.safetensors", metadata)}
    if adapter.modules:
        out["diffusers"] = export_diffusers(adapter, folder / f"{name}.diffusers.safetensors", drop_embeddings=True)
        for component in adapter.components:
            if not adapter.modules_of(component):
                continue
            # Named like every other partial write (`.<name>.<random>.tmp`): a server restarted
            # after a kill -9 mid-export removes it with the rest (training_jobs).
            with tempfile.TemporaryDirectory(dir=folder, prefix=f".{name}.peft_{component}.", suffix=".tmp") as tmp:
                peft_dir = export_peft_folder(adapter, Path(tmp) / f"{name}.peft_{component}", component=component, drop_embeddings=True)
                archive = shutil.make_archive(str(Path(tmp) / "archive"), "zip", peft_dir)
                final = folder / f"{name}.peft_{component}.zip"
                Path(archive).replace(final)
            out[f"peft_{component}"] = final
    if adapter.embeddings:
        vectors = {token: per["text_encoder"] for token, per in adapter.embeddings.items()}
        out["embeddings"] = write_safetensors(folder / f"{name}.embeddings.safetensors", vectors)
    return out

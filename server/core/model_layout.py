"""What parsing an adapter file needs to know of a served model besides its weight shapes.

- `unet_config`: kohya SDXL files name UNet blocks the SGM way (`input_blocks_4_1_...`); mapping
  them to diffusers' names needs the UNet's `layers_per_block`.
- `module_trees`: cloneofsimo files index their modules by the order the injector walks the model,
  with no names (lora/formats/cloneofsimo.py); placing them needs the UNet's and the text
  encoder's module lists.

Both come from the model folder's config files (lora/model_folder.py), not from the loaded
engines, so a model served by compiled engines without torch modules has them too. The module
lists are built on first use, since only cloneofsimo files need them, then kept per model: plain
(name, class name, is Linear/Conv2d) tuples, about 300 for the default model and a few thousand
for SD 1.5, never a tensor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from impasto.lora.model_folder import FolderModuleTrees, unet_config_of


class ModelLayout:
    def __init__(self, folder: Path):
        self.unet_config = unet_config_of(folder)
        self.module_trees = FolderModuleTrees(folder)

    def parse_context(self) -> dict:
        """The keyword arguments `impasto.lora.load_adapter` takes for this model."""
        return {"unet_config": self.unet_config, "module_trees": self.module_trees}


class ModelLayouts:
    """The layout of each model by name, made once per model. `folder_of` gives a model's folder,
    or None for a model the server does not know (then formats that need a layout say so)."""

    def __init__(self, folder_of: Callable[[str], Path | None]):
        self.folder_of = folder_of
        self._layouts: dict[str, ModelLayout] = {}
        self._lock = threading.Lock()

    def __call__(self, model: str) -> ModelLayout | None:
        with self._lock:
            layout = self._layouts.get(model)
            if layout is None:
                folder = self.folder_of(model)
                if folder is None:
                    return None
                layout = self._layouts[model] = ModelLayout(folder)
            return layout

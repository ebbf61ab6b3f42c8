"""Engine weights held in host arrays that we own and the runtime reads in place (onnxruntime's
overridable initializers and fed inputs, OpenVINO's weight parameters): refit writes into them,
restore puts the base back.

Restore is lazy. The engine router restores then refits at every switch, so copying back the
weights that the refit right after overwrites (all of them when two sets share targets: 128
weights, 357 MB, ~22 ms on SD 1.5) would be wasted: a refit copies back only the weights it does
not write, and the next run whatever is still marked.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


class HostWeights:
    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays  # engine name -> the live array the runtime reads
        self._base: dict[str, np.ndarray] = {}  # pristine copies, only of weights ever refitted
        self._pending: set[str] = set()  # engine names to copy back from _base before the next run

    def refit(self, refit_map: Mapping, named_weights: Mapping[str, torch.Tensor]) -> None:
        # Check every weight before touching any, so a bad one leaves the engine as it was.
        for name, value in named_weights.items():
            refit_map[name].check(name, value)
        written = set()
        for name, value in named_weights.items():
            entry = refit_map[name]
            if entry.engine_name not in self._base:
                self._base[entry.engine_name] = self.arrays[entry.engine_name].copy()
            entry.write_into(name, value, self.arrays[entry.engine_name])
            written.add(entry.engine_name)
        self._pending -= written  # overwritten anyway: no need to copy the base back first
        self.finish_restore()

    def restore(self) -> None:
        self._pending |= self._base.keys()

    def finish_restore(self) -> bool:
        """Copy back what restore() marked; True if anything was."""
        for engine_name in self._pending:
            np.copyto(self.arrays[engine_name], self._base[engine_name])
        restored = bool(self._pending)
        self._pending = set()
        return restored

"""Read an engine's refittable weights out of an ONNX file into numpy buffers the engine owns.

The compiler stores every refittable weight as external data (`<graph>.onnx.data`), so the
graph loads small and the weights go straight from the file into one buffer each, without a
second copy in a protobuf.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper


def read_graph(path: Path) -> onnx.ModelProto:
    """The graph with its inline constants, without loading external weights."""
    return onnx.load(str(path), load_external_data=False)


def read_weights(model: onnx.ModelProto, folder: Path, names) -> dict[str, np.ndarray]:
    """The named initializers as writable arrays (external ones read from their file)."""
    wanted = set(names)
    weights: dict[str, np.ndarray] = {}
    for init in model.graph.initializer:
        if init.name not in wanted:
            continue
        if external_data_helper.uses_external_data(init):
            info = external_data_helper.ExternalDataInfo(init)
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
            count = int(np.prod(init.dims)) if init.dims else 1
            array = np.fromfile(folder / info.location, dtype=dtype, count=count, offset=int(info.offset or 0))
            weights[init.name] = array.reshape(tuple(init.dims))
        else:
            weights[init.name] = numpy_helper.to_array(init).copy()
    missing = wanted - weights.keys()
    if missing:
        raise ValueError(f"weights missing from the graph: {', '.join(sorted(missing)[:10])}")
    return weights

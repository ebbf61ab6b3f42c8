"""Give every torch parameter its own named ONNX initializer, and write the refit map from them.

This is our own pass, not an ecosystem one, because no exporter option gives what refit
needs: one initializer per torch parameter, named exactly like it, in a known layout.

After `torch.onnx.export(..., do_constant_folding=False)`:
- every parameter is an initializer named `model.<torch name>`, except that the exporter
  deduplicates initializers of equal value (`_jit_pass_onnx_deduplicate_initializers`) and
  feeds the others through `Identity` nodes. Random-init and fine-tuned models have many
  equal tensors (all-ones norm weights, all-zero biases); refitting one of them must not
  change the others, so we give each its own copy again;
- a `Linear` on 3-D input is exported as `MatMul(x, Transpose(W))`. We store `W.T` under W's
  name and record `transpose` in the map, so the runtimes see a plain constant MatMul (the
  layout ONNX Runtime prepacks and OpenVINO turns into FullyConnected).

The refit map (torch name -> engine weight name, layout, dtype) is then read off the graph,
not guessed from tensor content.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from impasto.backends.manifest import RefitEntry

from .onnx_export import WRAPPED


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for out in graph.output:
        if out.name == old:
            raise ValueError(f"cannot rename graph output {old}")


def name_weights(model: onnx.ModelProto, torch_params: dict[str, tuple[int, ...]]) -> dict[str, RefitEntry]:
    """Rewrite `model` in place so each torch parameter is one initializer named by its torch
    name; return the refit map for the parameters the graph uses.

    `torch_params` maps the component module's parameter names (no wrapper prefix) to shapes.
    """
    graph = model.graph
    prefix = WRAPPED + "."
    inits = {init.name: init for init in graph.initializer}

    # 1. Undo the exporter's deduplication: Identity(initializer) -> its own initializer.
    for node in list(graph.node):
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0].startswith(prefix):
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            inits[copy.name] = copy
            graph.node.remove(node)

    # 2. Fold Transpose(W) into a transposed initializer under W's name, when W feeds only it.
    users = _consumers(graph)
    transposed: set[str] = set()
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits or len(users[node.input[0]]) != 1:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        name = node.input[0]
        array = numpy_helper.to_array(inits[name])
        if array.ndim != 2 or perm not in (None, [1, 0]):
            continue
        replacement = numpy_helper.from_array(np.ascontiguousarray(array.T), name)
        inits[name].CopyFrom(replacement)
        _rename_input(graph, node.output[0], name)
        graph.node.remove(node)
        transposed.add(name)

    # 3. Drop the wrapper prefix so engine weight names are the torch names, and map them.
    refit: dict[str, RefitEntry] = {}
    users = _consumers(graph)
    for init in graph.initializer:
        if not init.name.startswith(prefix):
            continue
        torch_name = init.name[len(prefix):]
        if torch_name not in torch_params:
            continue  # a buffer, not a parameter (e.g. CLIP's position_ids)
        old = init.name
        init.name = torch_name
        for node in users[old]:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = torch_name
        engine_shape = tuple(init.dims)
        layout = "transpose" if old in transposed else "same"
        expected = tuple(reversed(torch_params[torch_name])) if layout == "transpose" else tuple(torch_params[torch_name])
        if engine_shape != expected:
            raise ValueError(f"{torch_name}: exported shape {engine_shape} does not match torch {torch_params[torch_name]} ({layout})")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
        refit[torch_name] = RefitEntry(engine_name=torch_name, shape=tuple(torch_params[torch_name]), layout=layout, dtype=dtype)
    return refit


def save_with_external_weights(model: onnx.ModelProto, path: Path, weight_names) -> None:
    """Save `model` with the named weights in `<path>.data` (64-byte aligned), the rest inline.

    Engines read refittable weights straight from that file into buffers they own
    (`backends/onnx_weight_file.py`), and the graph file stays small.
    """
    weight_names = set(weight_names)
    data_name = path.name + ".data"
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        for init in model.graph.initializer:
            if init.name not in weight_names:
                continue
            raw = numpy_helper.to_array(init).tobytes()
            pad = (-offset) % 64
            data.write(b"\0" * pad)
            offset += pad
            data.write(raw)
            external_data_helper.set_external_data(init, data_name, offset=offset, length=len(raw))
            init.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data"):
                init.ClearField(field)
            init.data_location = onnx.TensorProto.EXTERNAL
            offset += len(raw)
    onnx.save_model(model, str(path))


def weight_dtypes(model: onnx.ModelProto, refit: dict[str, RefitEntry]) -> dict[str, RefitEntry]:
    """The map with each entry's dtype read from the graph; raises if a transform dropped a weight."""
    inits = {init.name: init for init in model.graph.initializer}
    updated = {}
    for torch_name, entry in refit.items():
        init = inits.get(entry.engine_name)
        if init is None:
            raise ValueError(f"{torch_name}: a graph transform removed or renamed its weight {entry.engine_name}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
        updated[torch_name] = RefitEntry(entry.engine_name, entry.shape, entry.layout, dtype)
    return updated

"""The exporter pass that gives every torch weight its own named initializer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper

from impasto.compiler.onnx_export import ExportSpec, export_onnx
from impasto.compiler.onnx_weights import name_weights


class _Block(torch.nn.Module):
    """A Linear on 3-D input (exported as MatMul(x, Transpose(W))) and two equal LayerNorms."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.proj = torch.nn.Linear(8, 6)
        self.model.norm_a = torch.nn.LayerNorm(6)
        self.model.norm_b = torch.nn.LayerNorm(6)  # equal to norm_a: the exporter dedupes them

    def forward(self, x):
        return self.model.norm_b(self.model.norm_a(self.model.proj(x)))


def test_every_weight_gets_its_torch_name_and_layout(tmp_path):
    block = _Block().eval()
    spec = ExportSpec(block, ("x",), ("y",), (torch.randn(2, 3, 8),), {"x": {0: "batch"}})
    export_onnx(spec, tmp_path / "raw.onnx")
    model = onnx.load(str(tmp_path / "raw.onnx"))
    params = {name: tuple(p.shape) for name, p in block.model.named_parameters()}
    refit = name_weights(model, params)

    assert set(refit) == set(params)
    assert refit["proj.weight"].layout == "transpose"
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    np.testing.assert_array_equal(inits["proj.weight"], block.model.proj.weight.detach().numpy().T)
    # the deduplicated norms are separate initializers again, so refitting one leaves the other
    assert "norm_a.weight" in inits and "norm_b.weight" in inits
    assert not any(node.op_type == "Identity" and node.input[0] in inits for node in model.graph.node)

    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, block(torch.from_numpy(x)).detach().numpy(), atol=1e-5)

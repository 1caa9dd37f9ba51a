"""ONNX Runtime rewrites that change results stay off, in the service and in export verification.

onnxruntime 1.31's Pad_Fusion folds a zero Pad into a following MaxPool, whose own padding is
-inf: a window that sees only padding and negative values gives a negative maximum, not 0.
The oracle is onnx's reference evaluator.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnxruntime as ort
from onnx import TensorProto, helper

from export.onnx_io import cpu_session
from service.runtime import SessionFactory


def pad_then_maxpool() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    pads = helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 1, 1, 0, 0, 1, 1])
    graph = helper.make_graph(
        [
            helper.make_node("Pad", ["x", "pads"], ["padded"], mode="constant"),
            helper.make_node("MaxPool", ["padded"], ["y"], kernel_shape=[3, 3], strides=[2, 2]),
        ],
        "pad_maxpool",
        [x],
        [y],
        [pads],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_pad_before_maxpool_is_served_and_verified_exactly():
    model = pad_then_maxpool()
    x = -1.0 - np.abs(np.random.default_rng(0).standard_normal((1, 2, 5, 5))).astype(np.float32)
    expected = onnx.reference.ReferenceEvaluator(model).run(None, {"x": x})[0]
    assert (expected == 0).any()  # windows that see only padding: the zero pad wins

    default = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fused = default.run(None, {"x": x})[0]
    served = SessionFactory("cpu", 0, 1).create(model.SerializeToString()).run(None, {"x": x})[0]
    verified = cpu_session(model).run(None, {"x": x})[0]

    np.testing.assert_array_equal(served, expected)
    np.testing.assert_array_equal(verified, expected)
    # Why the option exists: with ORT's defaults the result is wrong (if a later ORT fixes
    # Pad_Fusion, this line tells us the workaround can go).
    assert not np.array_equal(fused, expected)

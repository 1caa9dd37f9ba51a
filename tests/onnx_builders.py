"""Small ONNX graphs built with onnx.helper, for fold tests independent of any exporter."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(1234)


def rand(*shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return RNG.uniform(low, high, size=shape).astype(np.float32)


def bn_params(prefix: str, channels: int) -> list[onnx.TensorProto]:
    """Non-trivial BN parameters: every term of the fold matters."""
    return [
        numpy_helper.from_array(rand(channels, low=0.5, high=1.5), f"{prefix}.weight"),
        numpy_helper.from_array(rand(channels), f"{prefix}.bias"),
        numpy_helper.from_array(rand(channels), f"{prefix}.running_mean"),
        numpy_helper.from_array(rand(channels, low=0.2, high=2.0), f"{prefix}.running_var"),
    ]


def bn_node(prefix: str, x: str, y: str, **attrs) -> onnx.NodeProto:
    inputs = [x] + [f"{prefix}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
    return helper.make_node("BatchNormalization", inputs, [y], name=prefix, **attrs)


def const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def model(
    nodes, initializers, inputs: dict[str, list], outputs: dict[str, list | None], opset: int = 17
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
        initializer=initializers,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    m = onnx.shape_inference.infer_shapes(m)  # fills in output shapes given as None
    del m.graph.value_info[:]  # the folder must find shapes itself
    onnx.checker.check_model(m)
    return m


def run(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    # The oracle must compute BatchNormalization as written, not pre-fused by ORT.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    cpu = ["CPUExecutionProvider"]
    return ort.InferenceSession(m.SerializeToString(), options, providers=cpu).run(None, feeds)


def op_types(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]

"""ONNX helpers shared by both export paths: v2 tensor specs, dynamic batch, ORT sessions."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from .card import TensorSpec

V2_DATATYPES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "FP64",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.BOOL: "BOOL",
    TensorProto.STRING: "BYTES",
}

BATCH_DIM = "batch"


def tensor_specs(values) -> list[TensorSpec]:
    """v2 specs for graph inputs or outputs: -1 for every dimension without a fixed size."""
    specs = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        specs.append(
            TensorSpec(
                name=value.name, datatype=V2_DATATYPES.get(tensor.elem_type, "?"), shape=shape
            )
        )
    return specs


def make_batch_dynamic(model: onnx.ModelProto) -> None:
    """Give every graph input and output a symbolic leading dimension, in place.

    Stale value_info would pin the old batch size, so it is dropped (ORT infers shapes itself).
    """
    changed = False
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].dim_param:
            dims[0].Clear()
            dims[0].dim_param = BATCH_DIM
            changed = True
    if changed:
        del model.graph.value_info[:]


def batch_norm_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def cpu_session(model: onnx.ModelProto | bytes) -> ort.InferenceSession:
    """A CPU ORT session: verification must not depend on which GPU the exporting host has."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = model if isinstance(model, bytes) else model.SerializeToString()
    # Pad_Fusion folds a zero Pad into a following MaxPool, whose padding is -inf, not 0
    # (onnxruntime 1.31): the service turns it off too, so what is verified is what is served.
    return ort.InferenceSession(
        data, options, providers=["CPUExecutionProvider"], disabled_optimizers=["Pad_Fusion"]
    )


def run(session: ort.InferenceSession, inputs: list[np.ndarray]) -> list[np.ndarray]:
    feeds = {meta.name: value for meta, value in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)

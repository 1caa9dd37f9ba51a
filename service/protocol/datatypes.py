"""KServe v2 datatypes and their numpy and ONNX counterparts."""

from __future__ import annotations

import numpy as np

V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_V2 = {v: k for k, v in V2_TO_NUMPY.items()}
DATATYPES = (*V2_TO_NUMPY, "BF16")

# ONNX Runtime's type strings for session inputs and outputs.
ORT_TO_V2 = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}

TRITON_TYPES = {name: f"TYPE_{'STRING' if name == 'BYTES' else name}" for name in DATATYPES}


def numpy_dtype(datatype: str) -> np.dtype:
    return V2_TO_NUMPY[datatype]


def element_size(datatype: str) -> int | None:
    """Bytes per element in the binary extension; None for variable-size BYTES."""
    if datatype == "BYTES":
        return None
    if datatype == "BF16":
        return 2
    return V2_TO_NUMPY[datatype].itemsize

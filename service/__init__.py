"""bnserve service: the model repository served over the Open Inference Protocol (KServe v2)
with ONNX Runtime, in deterministic eval mode. Never imports torch or the export package."""

__version__ = "0.1.0"

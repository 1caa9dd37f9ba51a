"""ONNX Runtime sessions in deterministic eval mode, on CUDA when it really runs, else CPU.

onnxruntime-gpu lists CUDAExecutionProvider as available whenever it is installed, and falls
back to CPU, with only a log line, when CUDA or cuDNN libraries are missing. So the provider a
session reports (`get_providers()[0]`) is what the service logs and shows in model metadata.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger("bnserve.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# model.onnx sizes up to this get one intra-op thread when the count is automatic.
TINY_MODEL_BYTES = 1024 * 1024

# ONNX Runtime rewrites that change results. Pad_Fusion folds a zero Pad into the following
# MaxPool's own padding, which pads with -inf, not 0 (onnxruntime 1.31; timm's ResNetV2-BiT stem
# has this Pad -> MaxPool): outputs differ wherever a window sees only padding and negatives.
INEXACT_OPTIMIZERS = ("Pad_Fusion",)


def physical_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class SessionFactory:
    providers: str = "auto"  # auto | cuda | cpu
    device_id: int = 0
    intra_op_threads: int = 0

    def threads_for(self, model_bytes: int) -> int:
        """intra-op threads: as configured, else one for a tiny model (its ops are too small
        to split; waking a pool costs more than it saves: digits 45 vs 58 µs a run), else
        one per core."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return 1 if model_bytes <= TINY_MODEL_BYTES else physical_cores()

    def options(self, threads: int | None = None) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or self.intra_op_threads or physical_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Deterministic kernels where ORT has a choice (CUDA reductions, scatter, ...).
        options.use_deterministic_compute = True
        # Spinning threads would starve each other with several sessions on few cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3
        return options

    def provider_chain(self) -> list:
        if self.providers == "cpu":
            return [CPU]
        reason = cuda_unusable_reason()
        if reason is not None:
            if self.providers == "cuda":
                raise RuntimeError(f"BNSERVE_PROVIDERS=cuda but CUDA cannot run: {reason}")
            return [CPU]
        cuda_options = {
            "device_id": str(self.device_id),
            # No benchmarking search: EXHAUSTIVE may pick a different algorithm run to run.
            "cudnn_conv_algo_search": "DEFAULT",
            # TF32 would round float32 matmuls/convs to a 10-bit mantissa: not eval-exact.
            "use_tf32": "0",
        }
        return [(CUDA, cuda_options), CPU]

    def create(self, model: Path | bytes) -> ort.InferenceSession:
        source = str(model) if isinstance(model, Path) else model
        size = model.stat().st_size if isinstance(model, Path) else len(model)
        session = ort.InferenceSession(
            source,
            self.options(self.threads_for(size)),
            providers=self.provider_chain(),
            disabled_optimizers=list(INEXACT_OPTIMIZERS),
        )
        actual = session.get_providers()[0]
        if self.providers == "cuda" and actual != CUDA:
            raise RuntimeError(
                "BNSERVE_PROVIDERS=cuda but the CUDA execution provider did not start "
                f"(session runs on {actual}); check the CUDA 13 and cuDNN 9 libraries"
            )
        return session


@functools.cache
def cuda_unusable_reason() -> str | None:
    """Why the CUDA EP cannot run here, or None if it can be tried.

    Asking ORT for CUDA without a driver or libraries makes it log errors and fall back, so
    probe first: a driver with a device, then the CUDA EP library with all its dependencies
    (CUDA 13, cuDNN 9), after loading them from pip's nvidia-* packages where installed.
    """
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA execution provider"
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found)"
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return "the NVIDIA driver reports no usable device"
    if count.value == 0:
        return "no CUDA device"
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # system-wide libraries may still be there
            log.debug("onnxruntime.preload_dlls: %s", exc)
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        return f"CUDA/cuDNN libraries missing ({exc})"
    return None


def provider_of(session: ort.InferenceSession) -> str:
    return session.get_providers()[0]

"""Proof that an exported graph is right, run at every export.

Tolerances (relative to the largest magnitude of the oracle's output, per output tensor):
  parity: folded model.onnx (ONNX Runtime, CPU) vs the oracle (PyTorch eval forward, or
          reference.onnx for ONNX input) <= 1e-4 for float32 (1e-2 for 16-bit floats);
          folding reorders float32 arithmetic, which moves results by a few ulps per layer;
  batch independence: each sample run alone vs inside the batch <= 1e-5 (bitwise equality is
          reported too; ORT's CPU kernels usually give it);
  no BatchNormalization node may be left in model.onnx.
"""

from __future__ import annotations

import numpy as np
import onnx

from .card import Verification
from .errors import VerificationError
from .onnx_io import batch_norm_count, cpu_session, run

PARITY_TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-8}
HALF_PARITY_TOLERANCE = 1e-2
BATCH_INDEPENDENCE_TOLERANCE = 1e-5
INDEPENDENCE_SAMPLES = 8
CHUNK = 64


def verify_export(
    folded: onnx.ModelProto,
    reference: onnx.ModelProto,
    inputs: list[np.ndarray],
    oracle_outputs: list[np.ndarray] | None,
) -> Verification:
    """Check folded against the oracle (PyTorch outputs if given, else reference.onnx)."""
    try:
        folded_session, reference_session = cpu_session(folded), cpu_session(reference)
        got = _run_chunked(folded_session, inputs)
        from_reference = _run_chunked(reference_session, inputs)
    except Exception as exc:  # ORT rejects the graph or fails to run it
        detail = " ".join(str(exc).split())[:300]
        raise VerificationError(
            f"ONNX Runtime cannot run the exported graph on a batch of {len(inputs[0])}: "
            f"{detail}; expected a graph with a dynamic batch axis that ONNX Runtime runs"
        ) from exc
    expected = oracle_outputs if oracle_outputs is not None else from_reference
    parity_abs, parity_rel = _errors(got, expected)
    reference_rel = _errors(from_reference, expected)[1] if oracle_outputs is not None else None
    independence, bitwise = _batch_independence(folded_session, inputs, got)
    dtype = np.dtype(expected[0].dtype) if expected else np.dtype(np.float32)
    parity_tolerance = PARITY_TOLERANCE.get(dtype, HALF_PARITY_TOLERANCE)
    result = Verification(
        oracle="pytorch-eval" if oracle_outputs is not None else "reference.onnx",
        samples=int(inputs[0].shape[0]),
        parity_max_abs_error=parity_abs,
        parity_rel_error=parity_rel,
        reference_rel_error=reference_rel,
        batch_independence_rel_error=independence,
        batch_independence_bitwise=bitwise,
        batch_norm_nodes_left=batch_norm_count(folded),
        tolerances={
            "parity_rel_error": parity_tolerance,
            "batch_independence_rel_error": BATCH_INDEPENDENCE_TOLERANCE,
        },
        execution_provider="CPUExecutionProvider",
    )
    failures = []
    if not parity_rel <= parity_tolerance:
        failures.append(f"parity error {parity_rel:.3g} > {parity_tolerance:g}")
    if reference_rel is not None and not reference_rel <= parity_tolerance:
        failures.append(f"reference.onnx error {reference_rel:.3g} > {parity_tolerance:g}")
    if not independence <= BATCH_INDEPENDENCE_TOLERANCE:
        failures.append(
            f"outputs depend on the rest of the batch: error {independence:.3g} > "
            f"{BATCH_INDEPENDENCE_TOLERANCE:g}"
        )
    if result.batch_norm_nodes_left:
        failures.append(f"{result.batch_norm_nodes_left} BatchNormalization node(s) left")
    if failures:
        raise VerificationError(
            "verification failed: " + "; ".join(failures) + f" (over {result.samples} samples)"
        )
    return result


def _run_chunked(session, inputs: list[np.ndarray]) -> list[np.ndarray]:
    parts = [
        run(session, [x[i : i + CHUNK] for x in inputs]) for i in range(0, len(inputs[0]), CHUNK)
    ]
    return [np.concatenate(chunk) for chunk in zip(*parts, strict=True)]


def _errors(got: list[np.ndarray], expected: list[np.ndarray]) -> tuple[float, float]:
    worst_abs, worst_rel = 0.0, 0.0
    for g, e in zip(got, expected, strict=True):
        if g.shape != e.shape:
            raise VerificationError(
                f"output shape {g.shape} differs from the oracle's {e.shape}"
                + ("; the graph fixes the batch size" if g.shape[:1] != e.shape[:1] else "")
                + "; expected the oracle's shapes with a dynamic batch axis"
            )
        g64, e64 = g.astype(np.float64), e.astype(np.float64)
        diff = float(np.max(np.abs(g64 - e64), initial=0.0))
        if not np.isfinite(diff):  # NaN in one and not the other, or Inf
            diff = 0.0 if np.array_equal(g64, e64, equal_nan=True) else float("inf")
        scale = float(np.max(np.abs(e64[np.isfinite(e64)]), initial=0.0))
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale > 0 else diff)
    return worst_abs, worst_rel


def _batch_independence(session, inputs, batched) -> tuple[float, bool]:
    """The first samples each alone, and the first chunk reversed, against the batched run."""
    size = min(CHUNK, len(inputs[0]))
    inputs, batched = [x[:size] for x in inputs], [y[:size] for y in batched]
    checks = [
        (run(session, [x[i : i + 1] for x in inputs]), [y[i : i + 1] for y in batched])
        for i in range(min(INDEPENDENCE_SAMPLES, size))
    ]
    if size > 1:
        reversed_out = run(session, [np.ascontiguousarray(x[::-1]) for x in inputs])
        checks.append(([y[::-1] for y in reversed_out], batched))
    worst, bitwise = 0.0, True
    for alone, together in checks:
        worst = max(worst, _errors(alone, together)[1])
        bitwise &= all(
            np.array_equal(a, t, equal_nan=True) for a, t in zip(alone, together, strict=True)
        )
    return worst, bitwise

"""Proof that an exported graph is right, run at every export.

Tolerances (relative to the largest magnitude of the oracle's output, per output tensor):
  parity: folded model.onnx (ONNX Runtime, CPU) vs the oracle (PyTorch eval forward, or
          reference.onnx for ONNX input) <= 1e-4 for float32 (1e-2 for 16-bit floats);
          folding reorders float32 arithmetic, which moves results by a few ulps per layer;
  conditioning: when a float64 oracle is given (PyTorch sources: a float64 copy of the model),
          parity is measured against it, and the limit is max(1e-4, K x the float32 source's own
          error against float64), K = CONDITIONING_FACTOR. Some deep models (SiLU and
          squeeze-excitation stacks, cancelling offsets) cannot be computed in float32 to 1e-4
          of their output scale, by PyTorch or anyone: the float32 oracle is then no better
          than the folded graph, and both "fail" though folding added nothing. A well-
          conditioned model (float32 error < 1e-4 / K) stays held to 1e-4;
          The float64 oracle runs on the first FLOAT64_SAMPLES samples only (float64
          convolutions are slow); on all samples the float32 parity must stay within the limit
          plus float32's own error, which |onnx - float64| <= limit implies;
  override: parity_tolerance replaces the limit (recorded in the card as such);
  batch independence: each sample run alone vs inside the batch <= 1e-5 (bitwise equality is
          reported too; ORT's CPU kernels usually give it);
  no BatchNormalization node may be left in model.onnx.

Why K = 4: model.onnx and PyTorch float32 are two float32 evaluations of the same function that
round differently (folded weights rounded once, other kernels, MLAS's vectorized activations),
so their errors against float64 are of the same order, not equal: a factor 2 covers the spread
of a maximum taken over many elements, another 2 covers kernels that are a few ulps less exact
than PyTorch's. The zoo measures the ratio on real architectures (benchmarks/zoo.py prints it);
a folding bug (a wrong scale, a dropped shift) is an error of the order of the output itself,
orders of magnitude above K x a float32 rounding error.

ONNX sources have no float64 oracle: ONNX Runtime's CPU kernels for Conv, pooling and Resize
are float32-only, and the ONNX reference evaluator is far too slow for real networks, so their
parity is held to the fixed limit against reference.onnx run in float32.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort

from .card import ParityRule, Verification
from .errors import InvalidInputError, VerificationError
from .onnx_io import batch_norm_count, cpu_session, run

PARITY_TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-8}
HALF_PARITY_TOLERANCE = 1e-2
CONDITIONING_FACTOR = 4.0
FLOAT64_SAMPLES = 8
BATCH_INDEPENDENCE_TOLERANCE = 1e-5
INDEPENDENCE_SAMPLES = 8
CHUNK = 64


def check_parity_tolerance(value: float | None) -> float | None:
    """The override as given, if usable: a positive finite relative error."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise InvalidInputError(
            f"parity_tolerance={value!r}; expected a positive number such as 1e-3 "
            "(max |onnx - oracle| / max |oracle|)"
        )
    return number


def verify_export(
    folded: onnx.ModelProto,
    reference: onnx.ModelProto,
    inputs: list[np.ndarray],
    oracle_outputs: list[np.ndarray] | None,
    *,
    float64_outputs: list[np.ndarray] | None = None,
    parity_tolerance: float | None = None,
) -> Verification:
    """Check folded against the oracle (PyTorch outputs if given, else reference.onnx).

    float64_outputs, the same oracle computed in float64, makes the parity limit conditioning-
    aware (see the module docstring); parity_tolerance overrides the limit.
    """
    parity_tolerance = check_parity_tolerance(parity_tolerance)
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
    float64_rel = source_rel = reference_float64_rel = None
    if float64_outputs is not None and oracle_outputs is not None:
        n = len(float64_outputs[0]) if float64_outputs else 0  # the first samples (see pytorch)
        float64_rel = _errors([y[:n] for y in got], float64_outputs)[1]
        source_rel = _errors([y[:n] for y in oracle_outputs], float64_outputs)[1]
        reference_float64_rel = _errors([y[:n] for y in from_reference], float64_outputs)[1]
    independence, bitwise = _batch_independence(folded_session, inputs, got)
    dtype = np.dtype(expected[0].dtype) if expected else np.dtype(np.float32)
    base = PARITY_TOLERANCE.get(dtype, HALF_PARITY_TOLERANCE)
    limit, rule = parity_limit(base, source_rel, parity_tolerance)
    result = Verification(
        oracle="pytorch-eval" if oracle_outputs is not None else "reference.onnx",
        samples=int(inputs[0].shape[0]),
        parity_max_abs_error=parity_abs,
        parity_rel_error=parity_rel,
        reference_rel_error=reference_rel,
        float64_rel_error=float64_rel,
        source_float32_rel_error=source_rel,
        reference_float64_rel_error=reference_float64_rel,
        parity_rule=rule,
        parity_tolerance_override=parity_tolerance,
        batch_independence_rel_error=independence,
        batch_independence_bitwise=bitwise,
        batch_norm_nodes_left=batch_norm_count(folded),
        tolerances={
            "parity_rel_error": limit,
            "batch_independence_rel_error": BATCH_INDEPENDENCE_TOLERANCE,
        }
        | ({"conditioning_factor": CONDITIONING_FACTOR} if source_rel is not None else {}),
        execution_provider="CPUExecutionProvider",
    )
    failures = []
    against = "float64 oracle" if float64_rel is not None else "oracle"
    measured = float64_rel if float64_rel is not None else parity_rel
    if not measured <= limit:
        failures.append(f"parity error against the {against} {measured:.3g} > {limit:.3g}")
    measured = reference_float64_rel if reference_float64_rel is not None else reference_rel
    if measured is not None and not measured <= limit:
        failures.append(f"reference.onnx error against the {against} {measured:.3g} > {limit:.3g}")
        target = float64_outputs if float64_rel is not None else expected
        failures.extend(_optimizer_diagnosis(folded, reference, inputs, target, limit))
    if source_rel is not None and not failures and not parity_rel <= limit + source_rel:
        # Samples past the float64 ones: |onnx - fp64| <= limit implies this bound.
        failures.append(
            f"parity error against the float32 oracle {parity_rel:.3g} > {limit + source_rel:.3g}"
            " (the limit plus float32's own error)"
        )
    if not independence <= BATCH_INDEPENDENCE_TOLERANCE:
        failures.append(
            f"outputs depend on the rest of the batch: error {independence:.3g} > "
            f"{BATCH_INDEPENDENCE_TOLERANCE:g}"
        )
    if result.batch_norm_nodes_left:
        failures.append(f"{result.batch_norm_nodes_left} BatchNormalization node(s) left")
    if failures:
        context = (
            f"PyTorch float32 itself is {source_rel:.3g} off float64, limit "
            f"{_describe_rule(rule, base)}"
            if source_rel is not None
            else f"limit {_describe_rule(rule, base)}"
        )
        raise VerificationError(
            "verification failed: "
            + "; ".join(failures)
            + f" (over {result.samples} samples; {context}); expected errors within the limit, "
            "or parity_tolerance= / --parity-tolerance to accept more"
        )
    return result


def _optimizer_diagnosis(folded, reference, inputs, target, limit) -> list[str]:
    """When reference.onnx (BN intact) fails too, whether ONNX Runtime's graph optimizations
    are what moves both: then folding is exact and the runtime is at fault (seen on BiT)."""
    n = len(target[0]) if target else 0
    try:
        errors = [
            _errors(_run_chunked(_unoptimized_session(g), [x[:n] for x in inputs]), target)[1]
            for g in (folded, reference)
        ]
    except Exception:  # the diagnosis is a courtesy: never mask the failure itself
        return []
    if not all(e <= limit for e in errors):
        return []
    return [
        "with ONNX Runtime's graph optimizations off (ORT_DISABLE_ALL) both are within the "
        f"limit (model.onnx {errors[0]:.3g}, reference.onnx {errors[1]:.3g}): ONNX Runtime's "
        "optimizer, not folding, changes this graph, and serving would see its outputs"
    ]


def _unoptimized_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def parity_limit(
    base: float, source_rel: float | None, override: float | None
) -> tuple[float, ParityRule]:
    """The parity limit and the rule that set it (see the module docstring)."""
    if override is not None:
        return override, "override"
    if source_rel is not None and CONDITIONING_FACTOR * source_rel > base:
        return CONDITIONING_FACTOR * source_rel, "conditioning"
    return base, "fixed"


def _describe_rule(rule: ParityRule, base: float) -> str:
    return {
        "override": "set by parity_tolerance",
        "conditioning": f"{CONDITIONING_FACTOR:g} x that",
        "fixed": f"the fixed {base:g}",
    }[rule]


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

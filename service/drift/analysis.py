"""Running the stat-drift graph and turning its taps into per-layer drift figures.

All figures are in units of the layer's running standard deviation sqrt(var_r + eps), so
layers of any scale compare: a mean shift of 1.0 means the batch's channel mean sits one
training-time standard deviation away from the stored mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import BadRequest
from ..repository import VersionFiles
from ..runtime import SessionFactory
from .graph import DriftGraph, build_drift_graph
from .schemas import (
    ChannelValue,
    DriftSummary,
    LayerDrift,
    OutputComparison,
    PathStatistics,
)

WORST_CHANNELS = 5


@dataclass
class Thresholds:
    warn: float
    drift: float

    def verdict(self, score: float) -> str:
        return "drift" if score >= self.drift else "warn" if score >= self.warn else "ok"


class DriftAnalyzer:
    """Built at model load from reference.onnx; one extra ORT session per model version."""

    def __init__(self, files: VersionFiles, factory: SessionFactory) -> None:
        reference = onnx.load(str(files.reference_path))
        names = {b.onnx_node: b.name for b in files.card.batch_norm if b.onnx_node}
        self.graph: DriftGraph = build_drift_graph(reference, names)
        self.session = factory.create(self.graph.model.SerializeToString())
        self.names = [o.name for o in self.session.get_outputs()]

    def check_batch(self, batch_size: int) -> None:
        """Refuse, before running, a batch that gives some layer one value per channel."""
        for layer in self.graph.layers:
            if layer.spatial is not None and batch_size * layer.spatial < 2:
                raise BadRequest(
                    f"BatchNorm layer '{layer.name}' sees one value per channel with a batch of "
                    f"{batch_size} (its input has no spatial positions), so batch statistics are "
                    "undefined, as in PyTorch train mode; expected a batch of at least 2"
                )

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, tensors), strict=True))

    def layers(
        self, taps: dict[str, np.ndarray], thresholds: Thresholds, with_values: bool
    ) -> list[LayerDrift]:
        result = []
        for layer in self.graph.layers:
            shape = taps[layer.tap("shape")]
            per_channel = int(np.prod(shape, dtype=np.int64)) // max(layer.channels, 1)
            if per_channel < 2:
                raise BadRequest(
                    f"BatchNorm layer '{layer.name}' sees one value per channel for this batch, "
                    "so batch statistics are undefined; expected a batch of at least 2"
                )
            rm = taps[layer.tap("running_mean")].astype(np.float64)
            rv = taps[layer.tap("running_var")].astype(np.float64)
            stats = {
                path: path_statistics(
                    taps[layer.tap(f"{path}_mean")], taps[layer.tap(f"{path}_var")],
                    rm, rv, layer.epsilon, with_values=with_values,
                )
                for path in ("global", "batch")
            }  # fmt: skip
            score = stats["global"].wasserstein_mean
            noise = noise_floor(per_channel)
            result.append(
                LayerDrift(
                    name=layer.name,
                    onnx_node=layer.node,
                    channels=layer.channels,
                    values_per_channel=per_channel,
                    score=score,
                    noise_floor=noise,
                    verdict=thresholds.verdict(score - noise),
                    global_path=stats["global"],
                    batch_path=stats["batch"],
                    running_mean=rm.tolist() if with_values else None,
                    running_var=rv.tolist() if with_values else None,
                )
            )
        return result

    def outputs(self, taps: dict[str, np.ndarray]) -> list[OutputComparison]:
        return [
            compare_outputs(name, taps[DriftGraph.batch_name(name)], taps[name])
            for name in self.graph.outputs
        ]

    def close(self) -> None:
        self.session = None


def noise_floor(values: int) -> float:
    """Expected standardized W2 between n Gaussian samples' moments and the true ones:
    the mean errs by 1/sqrt(n) and the standard deviation by 1/sqrt(2n)."""
    return float(np.sqrt(1.5 / values))


def path_statistics(
    mean: np.ndarray,
    var: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float,
    *,
    with_values: bool,
) -> PathStatistics:
    mean, var = mean.astype(np.float64), np.maximum(var.astype(np.float64), 0.0)
    scale = np.sqrt(running_var + eps)
    shift = np.abs(mean - running_mean) / scale
    log_ratio = np.log((var + eps) / (running_var + eps))
    spread = np.sqrt(var) - np.sqrt(np.maximum(running_var, 0.0))
    w2 = np.sqrt((mean - running_mean) ** 2 + spread**2) / scale
    worst = np.argsort(-shift, kind="stable")[:WORST_CHANNELS]
    return PathStatistics(
        mean_shift_mean=float(shift.mean()),
        mean_shift_max=float(shift.max()),
        worst_channels=[ChannelValue(channel=int(c), value=float(shift[c])) for c in worst],
        log_var_ratio_mean=float(log_ratio.mean()),
        log_var_ratio_max_abs=float(np.abs(log_ratio).max()),
        wasserstein_mean=float(w2.mean()),
        wasserstein_max=float(w2.max()),
        mean=mean.tolist() if with_values else None,
        var=var.tolist() if with_values else None,
    )


def compare_outputs(name: str, batch: np.ndarray, served: np.ndarray) -> OutputComparison:
    b, g = batch.astype(np.float64), served.astype(np.float64)
    diff = np.abs(b - g)
    norm = float(np.linalg.norm(g))
    agreement = None
    if g.ndim == 2 and g.shape[0]:
        agreement = float(np.mean(np.argmax(b, axis=1) == np.argmax(g, axis=1)))
    return OutputComparison(
        name=name,
        max_abs_diff=float(diff.max(initial=0.0)),
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        relative_l2=float(np.linalg.norm(b - g)) / norm if norm > 0 else float(np.linalg.norm(b)),
        argmax_agreement=agreement,
    )


def summarize(
    layers: list[LayerDrift], outputs: list[OutputComparison], thresholds: Thresholds
) -> DriftSummary:
    ranked = sorted(layers, key=lambda layer: -(layer.score - layer.noise_floor))
    score = ranked[0].score if ranked else 0.0
    verdict = thresholds.verdict(score - ranked[0].noise_floor) if ranked else "ok"
    drifted = [layer.name for layer in layers if layer.verdict == "drift"]
    if not layers:
        explanation = "the model has no BatchNorm layers: eval and train mode agree"
    elif verdict == "ok":
        explanation = (
            f"every BatchNorm layer's input is within {thresholds.warn:g} running standard "
            "deviations (Gaussian 2-Wasserstein, channel mean, beyond sampling noise) of its "
            "stored statistics"
        )
    else:
        explanation = (
            f"{ranked[0].name} sees inputs {score:.2f} running standard deviations from its "
            f"stored statistics (2-Wasserstein, channel mean); {len(drifted)} of {len(layers)} "
            f"layers at or above {thresholds.drift:g}"
        )
    if outputs:
        explanation += (
            f". Served (global-statistics) and train-mode (batch-statistics) outputs differ by "
            f"relative L2 {max(o.relative_l2 for o in outputs):.3g}"
        )
    return DriftSummary(
        verdict=verdict,
        score=score,
        most_drifted=[layer.name for layer in ranked[:3]],
        drifted_layers=drifted,
        thresholds={"warn": thresholds.warn, "drift": thresholds.drift},
        explanation=explanation,
    )

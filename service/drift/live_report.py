"""Turning a window of pooled statistics into the figures stat-drift gives for its served
path, with `insufficient` wherever a layer has too few values for its score to mean anything."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from .analysis import Thresholds, noise_floor, path_statistics
from .graph import TappedLayer
from .live import Window
from .live_schemas import LiveLayerDrift, LiveSummary, LiveWindow


@dataclass
class LayerReference:
    """What a window is compared with: the layer and its stored running statistics."""

    layer: TappedLayer
    running_mean: np.ndarray
    running_var: np.ndarray
    values_per_sample: int | None = None  # learnt from the first batch (spatial positions)


def values_needed(thresholds: Thresholds) -> int:
    """Values per channel for the noise floor sqrt(1.5 / n) to be at most warn / 2."""
    return math.ceil(1.5 / (thresholds.warn / 2) ** 2)


def window_report(
    window: Window,
    layers: list[LayerReference],
    thresholds: Thresholds,
    *,
    current: bool,
    with_values: bool,
) -> LiveWindow:
    needed = values_needed(thresholds)
    result: list[LiveLayerDrift] = []
    samples_needed = 0
    for ref, moments in zip(layers, window.layers, strict=True):
        layer = ref.layer
        base = {
            "name": layer.name,
            "onnx_node": layer.node,
            "channels": layer.channels,
            "values_per_channel": moments.count,
            "values_needed": needed,
        }
        if moments.count < needed:
            per_sample = ref.values_per_sample or 1
            samples_needed = max(samples_needed, math.ceil((needed - moments.count) / per_sample))
            result.append(LiveLayerDrift(**base, verdict="insufficient"))
            continue
        stats = path_statistics(
            moments.mean, moments.var, ref.running_mean, ref.running_var, layer.epsilon,
            with_values=with_values,
        )  # fmt: skip
        score, noise = stats.wasserstein_mean, noise_floor(moments.count)
        result.append(
            LiveLayerDrift(
                **base,
                score=score,
                noise_floor=noise,
                verdict=thresholds.verdict(score - noise),
                global_path=stats,
            )
        )
    return LiveWindow(
        start=utc(window.start),
        end=utc(window.end if window.end is not None else window.start),
        current=current,
        samples=window.samples,
        requests=window.requests,
        summary=summarize_live(result, thresholds, samples_needed),
        layers=result,
    )


def summarize_live(
    layers: list[LiveLayerDrift], thresholds: Thresholds, samples_needed: int
) -> LiveSummary:
    judged = [layer for layer in layers if layer.score is not None]
    ranked = sorted(judged, key=lambda layer: -(layer.score - layer.noise_floor))
    worst = thresholds.verdict(ranked[0].score - ranked[0].noise_floor) if ranked else "ok"
    drifted = [layer.name for layer in layers if layer.verdict == "drift"]
    lacking = [layer.name for layer in layers if layer.verdict == "insufficient"]
    if worst == "ok" and lacking:
        verdict = "insufficient"
        explanation = (
            f"{len(lacking)} of {len(layers)} BatchNorm layers have fewer than "
            f"{layers[0].values_needed} sampled values per channel in this window "
            f"(first: {lacking[0]}); about {samples_needed} more sampled requests are needed"
        )
    elif not layers:
        verdict, explanation = "ok", "the model has no BatchNorm layers"
    elif worst == "ok":
        verdict = "ok"
        explanation = (
            f"every BatchNorm layer's input in this window is within {thresholds.warn:g} "
            "running standard deviations (Gaussian 2-Wasserstein, channel mean, beyond sampling "
            "noise) of its stored statistics"
        )
    else:
        verdict = worst
        explanation = (
            f"{ranked[0].name} sees served inputs {ranked[0].score:.2f} running standard "
            f"deviations from its stored statistics (2-Wasserstein, channel mean); "
            f"{len(drifted)} of {len(layers)} layers at or above {thresholds.drift:g}"
        )
    return LiveSummary(
        verdict=verdict,
        score=ranked[0].score if ranked else None,
        most_drifted=[layer.name for layer in ranked[:3]],
        drifted_layers=drifted,
        samples_needed=samples_needed if lacking else None,
        thresholds={"warn": thresholds.warn, "drift": thresholds.drift},
        explanation=explanation,
    )


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)

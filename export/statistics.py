"""What to do with BatchNorm statistics before export, on the working copy of the model.

- Layers with track_running_stats=False normalize with batch statistics even in eval mode.
  `instance` replaces each with a per-sample normalization (train mode at batch size 1, as
  pix2pix-style models are run); `calibrate` gives them population statistics.
- `recalibrate` recomputes every layer's statistics (PreciseBN).

Population statistics are exact: pooled mean and biased variance over every calibration sample
and position, accumulated in float64 (Chan's parallel update), one layer at a time in execution
order with the layers before it already set. Each layer's statistics therefore describe the
input it really sees in the exported eval-mode network: on the calibration data its normalized
input has mean 0 and variance 1 exactly. This costs about (layers / 2) forward passes over the
calibration data, since each pass stops at the layer being measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from .errors import InvalidInputError

BatchNorm = nn.modules.batchnorm._BatchNorm


class PerSampleBatchNorm(nn.Module):
    """A track_running_stats=False BatchNorm applied to each sample alone.

    Identical to the layer's train-mode forward at batch size 1, and independent of the batch.
    """

    def __init__(self, bn: BatchNorm, name: str) -> None:
        super().__init__()
        self.weight, self.bias, self.eps, self.layer_name = bn.weight, bn.bias, bn.eps, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise InvalidInputError(
                f"BatchNorm layer '{self.layer_name}' gets input of shape {tuple(x.shape)}: one "
                "value per channel per sample, so per-sample statistics are undefined; expected "
                "spatial positions for batch_stats='instance' (use 'calibrate' for this layer)"
            )
        dims = tuple(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def batch_norm_layers(model: nn.Module) -> dict[str, BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BatchNorm)}


def untracked_layers(model: nn.Module) -> list[str]:
    """Layers that normalize with batch statistics in eval mode."""
    return [
        name for name, m in batch_norm_layers(model).items()
        if not m.track_running_stats or m.running_mean is None or m.running_var is None
    ]  # fmt: skip


def use_per_sample_statistics(model: nn.Module, layers: list[str]) -> None:
    for name in layers:
        model.set_submodule(name, PerSampleBatchNorm(model.get_submodule(name), name))


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged exactly in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        values = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        n = values.shape[1]
        mean = values.mean(1)
        m2 = ((values - mean[:, None]) ** 2).sum(1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total


class _Stop(Exception):
    pass


def set_population_statistics(
    model: nn.Module, layers: list[str], batches: list[tuple[torch.Tensor, ...]]
) -> dict[str, int]:
    """Give each named layer the exact population statistics of its input; returns the count
    of values per channel each layer was measured on."""
    if not layers:
        return {}
    model.eval()
    modules = batch_norm_layers(model)
    counts: dict[str, int] = {}
    for name in _execution_order(model, layers, batches[0]):
        moments = _Moments()

        def measure(_module, args, moments=moments):
            moments.update(args[0])
            raise _Stop

        handle = modules[name].register_forward_pre_hook(measure)
        try:
            with torch.no_grad():
                for batch in batches:
                    with contextlib.suppress(_Stop):
                        model(*batch)
        finally:
            handle.remove()
        if moments.mean is None or moments.count < 2:
            raise InvalidInputError(
                f"calibration gives BatchNorm layer '{name}' {moments.count} value(s) per "
                "channel; expected at least 2 (more calibration samples)"
            )
        _store(modules[name], moments)
        counts[name] = moments.count
    return counts


def _execution_order(model: nn.Module, layers: list[str], batch) -> list[str]:
    order: list[str] = []
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, _a, name=name: order.append(name) if name not in order else None
        )
        for name in layers
    ]
    try:
        with torch.no_grad():
            model(*batch)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in layers if name not in order]
    if missing:
        raise InvalidInputError(
            f"BatchNorm layer(s) {missing} never run in the forward pass, so their statistics "
            "cannot be calibrated; expected every calibrated layer to be used"
        )
    return order


def _store(bn: BatchNorm, moments: _Moments) -> None:
    mean = moments.mean.to(bn.weight.dtype if bn.weight is not None else torch.float32)
    var = (moments.m2 / moments.count).to(mean.dtype)
    if bn.running_mean is None:
        bn.register_buffer("running_mean", mean)
        bn.register_buffer("running_var", var)
        bn.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
    else:
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    bn.track_running_stats = True


def as_batches(data, inputs: int, batch_size: int = 64) -> list[tuple[torch.Tensor, ...]]:
    """Calibration data as a list of input tuples: a tensor, a tuple of tensors (one per model
    input), or an iterable of those (a DataLoader yielding (x, y) pairs works: extra items are
    dropped)."""
    if data is None:
        return []
    if isinstance(data, torch.Tensor):
        data = (data,)
    is_dataset = isinstance(data, tuple | list) and len(data) == inputs
    if is_dataset and all(isinstance(t, torch.Tensor) for t in data):
        total = data[0].shape[0]
        return [tuple(t[i : i + batch_size] for t in data) for i in range(0, total, batch_size)]
    batches = []
    for item in data if isinstance(data, Iterable) else [data]:
        items = (item,) if isinstance(item, torch.Tensor) else tuple(item)
        if len(items) < inputs or not all(isinstance(t, torch.Tensor) for t in items[:inputs]):
            raise InvalidInputError(
                f"calibration batch of type {type(item).__name__} is not usable; expected a "
                f"tensor or a tuple of {inputs} tensor(s) with a leading batch dimension"
            )
        batches.append(tuple(items[:inputs]))
    return batches

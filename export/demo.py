"""The demo: a small BatchNorm CNN trained on scikit-learn's bundled digits, exported as
models/digits/<version> with class labels and sample batches for the stat-drift endpoint.

The network takes raw pixel values (0..16) and starts with a BatchNorm used as input scaling,
as MXNet users do with use_global_stats; it ends with a BatchNorm1d head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .card import ExportReport
from .digits import SHIFTS, digits_split, shifted
from .publish import Progress, quiet

LABELS = [str(d) for d in range(10)]
MIN_ACCURACY = 0.95
SAMPLE_BATCH = 64


class DigitsNet(nn.Module):
    """8x8 grey digits -> 10 logits. Every BatchNorm kind the folder handles appears here."""

    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm2d(1)  # input scaling: raw pixels in, no conv before it
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 2 * 2, 64)
        self.head_bn = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.input_bn(images)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = self.pool(torch.relu(self.bn3(self.conv3(x))))
        x = torch.relu(self.head_bn(self.fc1(x.flatten(1))))
        return self.fc2(x)


def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/test split of the 1797 bundled digits as raw pixels shaped (N, 1, 8, 8)."""
    x_train, y_train, x_test, y_test = digits_split()
    return (
        torch.from_numpy(x_train),
        torch.from_numpy(y_train).long(),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test).long(),
    )


def train(epochs: int = 12, seed: int = 0) -> tuple[DigitsNet, float, torch.Tensor]:
    """Train deterministically; returns the model (in train mode), test accuracy, test images."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits()
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-2, total_steps=epochs * ((len(x_train) + 63) // 64)
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), 64):
            batch = order[i : i + 64]
            if len(batch) < 2:  # BatchNorm1d needs two samples in train mode
                continue
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, accuracy, x_test


def sample_batches(x_test: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batches for the stat-drift endpoint: as trained, and two shifts of the pixel values."""
    batch = x_test[:SAMPLE_BATCH].numpy()
    return {shift: torch.from_numpy(shifted(batch, shift)) for shift in SHIFTS}


def run_demo(
    repository: str | Path = "models",
    *,
    version: int = 1,
    epochs: int = 12,
    progress: Progress = quiet,
) -> tuple[ExportReport | None, float]:
    """Train and export the demo; returns (None, nan) when that version already exists."""
    from .pytorch import export_model

    if (Path(repository) / "digits" / str(version)).exists():
        return None, float("nan")
    progress(f"Training the digits CNN ({epochs} epochs)")
    model, accuracy, x_test = train(epochs)
    if accuracy < MIN_ACCURACY:
        raise RuntimeError(f"demo model reached {accuracy:.3f} test accuracy; expected >= 0.95")
    report = export_model(
        model,
        x_test[:8],
        repository=repository,
        name="digits",
        version=version,
        calibration=x_test,
        labels=LABELS,
        output_names=["logits"],
        samples=sample_batches(x_test),
        description=f"Digits CNN (sklearn digits, raw pixels 0-16), test accuracy {accuracy:.4f}",
        progress=progress,
    )
    return report, accuracy

"""Small PyTorch models shared by service tests (exported through the real export stage)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from export import export_model


class SmallResNet(nn.Module):
    """Conv/BN/residual/linear: the kernels where batching could change the arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)
        self.head_bn = nn.BatchNorm1d(10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x))).mean((2, 3))
        return self.head_bn(self.fc(x))


def export_small(
    repository: Path, *, name: str = "small", version: int | None = None, seed: int = 0
):
    """A trained-looking SmallResNet (running stats from train-mode passes) in the repository."""
    torch.manual_seed(seed)
    model = SmallResNet().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    return export_model(
        model.eval(), torch.randn(4, 3, 32, 32), repository=repository, name=name, version=version
    )

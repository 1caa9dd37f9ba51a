"""Model factories for the CLI tests (`--factory factories:<name>`); tests/ is on PYTHONPATH.

Every factory is deterministic in structure; weights come from the checkpoint the test writes.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (3, 16, 16)


class SmallNet(nn.Module):
    """Input-side BN, Conv+BN, BN after an activation, a Linear + BatchNorm1d head."""

    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.post_bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)
        self.head_bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_bn(x)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.post_bn(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.head_bn(self.fc(x.mean(dim=(2, 3)))))
        return self.out(x)


def build_x() -> nn.Module:
    return SmallNet()


def build_other() -> nn.Module:
    """A different architecture: SmallNet's weights do not fit it."""
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU())


def not_a_module() -> dict:
    return {"conv": "not a module"}


def trained_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A SmallNet state_dict with non-trivial BatchNorm statistics, as after training."""
    torch.manual_seed(seed)
    model = SmallNet()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1.0, 1.0, generator=generator)
                module.running_var.uniform_(0.2, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-1.0, 1.0, generator=generator)
                module.num_batches_tracked.fill_(123)
    return model.state_dict()

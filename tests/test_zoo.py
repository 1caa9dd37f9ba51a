"""Real architectures (the CI subset of benchmarks/zoo.py): exported exactly, checked independently.

Each model is randomly initialized with realistic BatchNorm statistics, exported through
export_model, then checked without reading the export's own verification: model.onnx under
ONNX Runtime on fresh inputs against PyTorch eval of a float64 copy, within max(1e-4, 4 x the
source's own float32 error); each sample alone against the batch; no BatchNormalization left;
the caller's model bit for bit. `make zoo` runs the whole list and prints the table.
"""

from __future__ import annotations

import importlib.util

import pytest

from benchmarks.zoo import INDEPENDENCE, PARITY, ZOO, check

if importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("timm") is None:
    pytest.skip(
        "torchvision/timm are not installed; `make zoo-deps` installs them (--no-deps)",
        allow_module_level=True,
    )

CI = [entry for entry in ZOO if entry.ci]

# What the fold must do beyond Conv+BN on each model: {removed_by: at least this many}, and
# how many BNs may be left as Mul+Add (the fallback every anchor tool also leaves unfolded).
EXPECTED: dict[str, tuple[dict[str, int], int]] = {
    "timm/mixnet_s": ({"folded_into_concatenated_convs": 1}, 0),
    "timm/repvgg_a0": ({"reparameterized_into_conv": 1}, 0),
}


def test_ci_subset_is_representative():
    names = {entry.name for entry in CI}
    assert 8 <= len(CI) <= 12
    assert {"torchvision/fpn_resnet18_frozen_bn", "torchvision/r3d_18"} <= names
    assert {"timm/mixnet_s", "timm/repvgg_a0", "timm/nf_regnet_b0"} <= names


@pytest.mark.parametrize("entry", CI, ids=[entry.name for entry in CI])
def test_architecture_exports_exactly(entry, tmp_path):
    result = check(entry, tmp_path)
    assert result.error is None, result.error
    assert result.untouched, "the caller's model changed"
    assert result.bn_left == 0
    assert result.parity <= max(PARITY, 4 * result.source), (
        f"parity {result.parity:.3g} vs PyTorch float64; float32 itself {result.source:.3g}"
    )
    assert result.independence <= INDEPENDENCE
    accounted = sum(result.removed_by.values())
    if result.bn_modules and entry.name != "torchvision/fpn_resnet18_frozen_bn":
        assert accounted == result.bn_nodes == result.bn_modules  # every layer on the card
    if entry.name == "torchvision/fpn_resnet18_frozen_bn":  # FrozenBatchNorm2d: Mul/Add ops
        assert result.bn_nodes == 0
        assert result.affine_folds >= result.bn_modules
    if entry.name == "timm/nf_regnet_b0":  # BN over the weight: constant-folded, none left
        assert result.constant_folds > 0
        assert result.bn_modules == 0
    minimum, affine_left = EXPECTED.get(entry.name, ({}, 0))
    for method, count in minimum.items():
        assert result.removed_by[method] >= count, dict(result.removed_by)
    assert result.affine_left <= affine_left, dict(result.removed_by)

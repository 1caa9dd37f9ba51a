"""Names for BatchNormalization nodes: the PyTorch module path where the producer recorded one."""

from __future__ import annotations

import onnx

_STAT_SUFFIXES = (".running_mean", "_running_mean", "/running_mean", ".moving_mean", "_moving_mean")


def layer_name(node: onnx.NodeProto) -> str:
    """`layer1.0.bn1` for a torch.onnx (dynamo) export; else a name derived from the node.

    The dynamo exporter records the module stack in the `namespace` metadata as
    `: Root/layer1: Sequential/layer1.0: Block/layer1.0.bn1: BatchNorm2d/<op>: aten.<op>`.
    """
    meta = {p.key: p.value for p in node.metadata_props}
    namespace = meta.get("namespace", "")
    if namespace:
        scopes = [seg.split(": ", 1) for seg in namespace.split("/") if ": " in seg]
        modules = [path for path, qualname in scopes if path and not qualname.startswith("aten.")]
        if modules:
            return modules[-1]
    if len(node.input) > 3:
        for suffix in _STAT_SUFFIXES:
            if node.input[3].endswith(suffix):
                return node.input[3][: -len(suffix)]
    return node.name or node.output[0]


def unique_names(names: list[str]) -> list[str]:
    """Suffix repeats (a module applied twice gives two nodes) with #2, #3, ..."""
    seen: dict[str, int] = {}
    result = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        result.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return result

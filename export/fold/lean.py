"""Rule 11: the served graph is as lean as torch's own optimized export.

After folding, model.onnx still carries the exporter's scaffolding: Identity nodes, chunk as
SplitToSequence + SequenceAt, Reshape chains, shape arithmetic, zero biases. onnxscript's
optimizer (the pass torch.onnx's optimize=True runs) removes it with rewrites that are exact
(no-op elimination, Cast-Cast only where the intermediate type holds every value, Pad into
Conv pads, common subexpressions, duplicate initializers). Constants were already folded in
float64 (constant_subgraphs), so its float32 constant folding only meets shape scaffolding; no
BatchNormalization is left for its Conv+BN fusion. Nodes it rewrote get back the names the fold
records refer to, matched by the tensor they produce.
"""

from __future__ import annotations

import logging

import onnx
import onnxscript.optimizer

from .constant_subgraphs import SMALL


def make_lean(model: onnx.ModelProto) -> onnx.ModelProto:
    """An exact, leaner copy of `model` whose nodes keep their names where they survive."""
    names = {n.output[0]: (n.op_type, n.name) for n in model.graph.node if n.output and n.name}
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    try:  # no constant bigger than constant_subgraphs would store (an Expand to a huge tensor)
        optimized = onnxscript.optimizer.optimize(copy, output_size_limit=SMALL)
    except Exception:  # leanness is a nicety: the folded graph is exact and served as it is
        logging.getLogger(__name__).warning("onnxscript could not simplify the folded graph")
        return model
    taken = {n.name for n in optimized.graph.node}
    for node in optimized.graph.node:
        found = names.get(node.output[0]) if node.output else None
        if found and found[0] == node.op_type and found[1] != node.name and found[1] not in taken:
            taken.discard(node.name)
            node.name = found[1]
            taken.add(node.name)
    return optimized

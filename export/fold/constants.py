"""Before folding: weights and biases computed from constants become plain initializers.

Exporters sometimes compute a parameter instead of storing it: torch.onnx builds the zero bias
of a bias-free convolution as Expand(CastLike(0, x), Shape(W)...) (for Conv3d even with a wrong
shape). Such subgraphs read activations (CastLike's target), which would count as extra
consumers and block folds. Resolved here: a constant bias of zeros is dropped (an absent bias
means zero), any other constant weight or bias is stored as an initializer.
"""

from __future__ import annotations

import numpy as np

from .graph import Graph
from .rules import parameter_inputs


def materialize_parameters(graph: Graph) -> int:
    """Rewrite computed constant parameters in place; returns how many inputs changed."""
    changed = 0
    parameters = parameter_inputs()
    for node in list(graph.graph.node):
        for index in parameters.get(node.op_type, ()):
            if len(node.input) <= index or not node.input[index]:
                continue
            name = node.input[index]
            if name in graph.initializers or name in graph.graph_inputs:
                continue
            value = graph.constant(name)
            if value is None:
                continue
            if index == 2 and not np.any(value):
                del node.input[2:]  # optional bias: absent means zero
            else:
                graph.set_input(node, index, value)
            changed += 1
    if changed:
        graph.prune()
    return changed

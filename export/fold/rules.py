"""The fold-rule table: every way a BatchNormalization can disappear, in the order tried.

Each rule names the op type that absorbs the BN's per-channel affine, on which side of the BN
that op sits (PRODUCER: it computes the BN's input; READER: it alone reads the BN's output), the
scaler that rewrites it (one signature, see scaling), the inputs that are its constant weight and
bias, and the `removed_by` name the model card records. Every dispatcher reads this table:
fold_batch_norms (which rule removes a BN), materialize_parameters (which inputs are weights),
fold_conv_affines (which producers absorb a Mul/Add by a constant) and the card's `removed_by`
enum. Adding a rule is one new module with its scaler plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .concat_conv_bn import scale_concat_output
from .conv_bn import scale_conv_output
from .conv_transpose_bn import scale_conv_transpose_output
from .forward_bn import fold_forward_into_conv, fold_forward_into_gemm, fold_forward_into_matmul
from .linear_bn import scale_gemm_output, scale_matmul_output
from .reparam_branches import merge_identity_branch
from .scaling import Scaler


class Side(Enum):
    PRODUCER = "producer"  # the op computes the BN's input x
    READER = "reader"  # the op is the only reader of the BN's output y


@dataclass(frozen=True)
class FoldRule:
    """One row of the table; its columns in the order the entries below give them."""

    op_type: str
    side: Side
    scale: Scaler
    parameters: tuple[int, ...]  # input indices of the constant weight and bias
    removed_by: str
    requires: str  # what the rule needs, for the one-line note when it refuses
    constant_affines: bool = False  # also absorbs Mul/Add/Sub/Div by per-channel constants


_WEIGHT = "a constant weight (and bias) of the shapes ONNX specifies"

RULES: tuple[FoldRule, ...] = (
    FoldRule(
        "Conv", Side.PRODUCER, scale_conv_output, (1, 2), "folded_into_conv", _WEIGHT,
        constant_affines=True,
    ),
    FoldRule(
        "ConvTranspose", Side.PRODUCER, scale_conv_transpose_output, (1, 2),
        "folded_into_conv_transpose", _WEIGHT, constant_affines=True,
    ),
    FoldRule("Gemm", Side.PRODUCER, scale_gemm_output, (1, 2), "folded_into_gemm", _WEIGHT),
    FoldRule(
        "MatMul", Side.PRODUCER, scale_matmul_output, (1,), "folded_into_matmul",
        "a constant 2-D weight and a rank-2 output",
    ),
    FoldRule(
        "Add", Side.PRODUCER, scale_matmul_output, (), "folded_into_matmul",
        "Add(MatMul(x, W), bias) with constant W and bias and a rank-2 output",
    ),
    FoldRule(
        "Concat", Side.PRODUCER, scale_concat_output, (), "folded_into_concatenated_convs",
        "a Concat along axis 1 of Conv outputs that nothing else reads",
    ),
    FoldRule(
        "Conv", Side.READER, fold_forward_into_conv, (1, 2), "folded_forward_into_conv",
        "a Conv without padding reading it as its data input",
    ),
    FoldRule(
        "Gemm", Side.READER, fold_forward_into_gemm, (1, 2), "folded_forward_into_gemm",
        "a Gemm without transA reading it as A",
    ),
    FoldRule(
        "MatMul", Side.READER, fold_forward_into_matmul, (1,), "folded_forward_into_matmul",
        "a MatMul reading a rank-2 input as its first operand",
    ),
    FoldRule(
        "Add", Side.READER, merge_identity_branch, (), "reparameterized_into_conv",
        "an Add summing it with shape-preserving convs of the same input (RepVGG)",
    ),
)  # fmt: skip

# What is left when no rule applies: one exact per-channel Mul+Add (affine_bn).
REWRITTEN_AS_AFFINE = "rewritten_as_affine"

REMOVED_BY: tuple[str, ...] = (
    *dict.fromkeys(rule.removed_by for rule in RULES),
    REWRITTEN_AS_AFFINE,
)


def producer_rule(op_type: str) -> FoldRule | None:
    return next((r for r in RULES if r.side is Side.PRODUCER and r.op_type == op_type), None)


def parameter_inputs() -> dict[str, tuple[int, ...]]:
    """Input indices of weights and biases per op type, over every rule."""
    indices: dict[str, set[int]] = {}
    for rule in RULES:
        indices.setdefault(rule.op_type, set()).update(rule.parameters)
    return {op: tuple(sorted(found)) for op, found in indices.items() if found}


def constant_affine_scalers() -> dict[str, Scaler]:
    """Producers that absorb a following per-channel Mul/Add/Sub/Div by a constant (rule 5)."""
    return {
        rule.op_type: rule.scale
        for rule in RULES
        if rule.side is Side.PRODUCER and rule.constant_affines
    }

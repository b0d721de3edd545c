"""General cleanup after the graph passes: fold small constants, drop what is unused.

:func:`cleanup_passes` composes onnx_ir's common passes and onnxscript's
constant folding into one :class:`onnx_ir.passes.PassManager` that repeats
until nothing changes.  Unused nodes *and initializers* go (so a pruned
expert's weights disappear); graph inputs and outputs never do.
"""

from __future__ import annotations

__all__ = ["FoldSmallConstantsPass", "cleanup_passes"]

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer

logger = logging.getLogger(__name__)


class FoldSmallConstantsPass(ir.passes.InPlacePass):
    """onnxscript constant folding, limited to small tensors.

    A node is folded only when every constant input has at most
    ``input_size_limit`` elements, and the folded result is kept only when it
    has at most ``output_size_limit`` elements (or does not grow the model).
    Unlike onnxscript's defaults this also refuses the "always fold" case of a
    ``Transpose`` of a large initializer: weights are never rewritten into new
    constants, so their dtype, layout and (external) storage stay as exported.
    ``ConstantOfShape`` is never folded (onnxscript's own rule).

    Wraps :func:`onnxscript.optimizer.fold_constants_ir` (onnxscript 0.7 does
    not export its ``FoldConstantsPass`` class).
    """

    def __init__(
        self,
        *,
        input_size_limit: int = 1024,
        output_size_limit: int = 64 * 1024,
        shape_inference: bool = False,
    ) -> None:
        super().__init__()
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit
        self.shape_inference = shape_inference

    def _should_fold(self, node: ir.Node) -> bool | None:
        for value in node.inputs:
            if value is None or value.const_value is None:
                continue
            if value.const_value.size > self.input_size_limit:
                return False
        return None  # onnxscript's default rules

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = onnxscript.optimizer.fold_constants_ir(
            model,
            onnx_shape_inference=self.shape_inference,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
            should_fold=self._should_fold,
        )
        return ir.passes.PassResult(model, modified=result.modified)


def cleanup_passes(
    *,
    steps: int = 4,
    fold_input_size_limit: int = 1024,
    fold_output_size_limit: int = 64 * 1024,
    dedup_size_limit: int = 1024,
    shape_inference: bool = False,
) -> ir.passes.PassManager:
    """The general cleanup, repeated until the graph stops changing (at most ``steps`` times).

    Args:
        steps: bound on the number of rounds.
        fold_input_size_limit: largest constant input (elements) a folded node may have.
        fold_output_size_limit: largest folded result (elements) that is stored.
        dedup_size_limit: largest initializer (elements) compared for deduplication.
        shape_inference: let the folder run ONNX node-level shape inference
            (adds value_info for the values it types).
    """
    return ir.passes.PassManager(
        [
            FoldSmallConstantsPass(
                input_size_limit=fold_input_size_limit,
                output_size_limit=fold_output_size_limit,
                shape_inference=shape_inference,
            ),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedFunctionsPass(),
            common_passes.RemoveUnusedOpsetsPass(),
            common_passes.DeduplicateInitializersPass(size_limit=dedup_size_limit),
        ],
        steps=steps,
        early_stop=True,
    )

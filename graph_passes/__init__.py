"""General ONNX-to-ONNX passes on ``onnx_ir`` for MoNE-pruned MoE models.

Every pass is an ``onnx_ir.passes`` pass (``call(model) -> PassResult``),
one module with its test beside it; they compose with
``onnx_ir.passes.PassManager`` / ``Sequential``.  On a graph without their
pattern they change nothing (``modified`` False), and a second run changes
nothing.

The canonical MoE dispatch form
-------------------------------
For each MoE layer, ``x: [T, H]`` (T dynamic) and ``W: [T, E]``, the dense
routing weights the model applies (a ScatterElements of the top-k weights into
zeros: 0 where an expert is not selected).  Expert outputs are accumulated
into ``acc`` (any start value, usually zeros ``[T, H]``).  For each expert
``e`` (an int64 scalar constant)::

    col_e = Gather(W, e, axis=1)                              # [T]
    sel_e = Greater(col_e, 0.0)                               # [T] bool, 0.0 in W's dtype
    nz_e  = NonZero(sel_e)                                    # [1, n]
    idx_e = Transpose(nz_e, perm=[1, 0])                      # [n, 1]
    tok_e = Squeeze(nz_e, axes=[0])                           # [n]
    w_e   = Unsqueeze(Gather(col_e, tok_e, axis=0), axes=[1]) # [n, 1]
    # real expert: ye = expert(Gather(x, tok_e, axis=0));  upd_e = Mul(ye, w_e)
    # novice:      upd_e = Mul(w_e, C_e)    C_e: constant [H] or [1, H]
    acc = ScatterND(acc, idx_e, upd_e, reduction="add")

(``Mul`` operands in either order.)  After :class:`NoviceBranchesToBiasPass`
a layer's novices are one bias::

    acc_final = Add(acc, MatMul(Gather(W, novice_ids, axis=1), C))   # C: [n_novices, H]

Passes
------
- :class:`ExpertsToNovicesPass` (plan -> novice branches),
- :class:`NoviceBranchesToBiasPass` (novice branches -> one bias per layer),
- :func:`cleanup_passes` (constant folding of small tensors, dead code,
  unused functions / opsets, duplicate initializers),
- :func:`prune_novices`: all of the above, in that order.

Passes for ONNX Runtime's contrib ops, run by the export where the graph uses them
(``--quant``, ``--attention gqa``): :mod:`graph_passes.quantize_weights` (``MatMulNBits`` /
``GatherBlockQuantized``) and :mod:`graph_passes.fuse_norms` (``SkipSimplifiedLayerNormalization``).
"""

from __future__ import annotations

__all__ = [
    "ExpertsToNovicesPass",
    "FoldSmallConstantsPass",
    "NoviceBranchesToBiasPass",
    "cleanup_passes",
    "explain_novice_mismatches",
    "prune_novices",
]

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graph_passes.cleanup import FoldSmallConstantsPass, cleanup_passes
from graph_passes.novice_bias import (
    ExpertsToNovicesPass,
    NoviceBranchesToBiasPass,
    explain_novice_mismatches,
)


def prune_novices(
    model: ir.Model, novices: Mapping[str, Mapping[int, np.ndarray]] | None = None
) -> ir.Model:
    """Novices -> constant bias per layer, then cleanup; in place, returns ``model``.

    Args:
        model: the exported model in the canonical MoE dispatch form.
        novices: optional plan ``{W value name: {expert: mean vector [H]}}``;
            when given, those real experts first become novices
            (:class:`ExpertsToNovicesPass`), so this works from an unpruned
            export.

    Raises:
        onnx_ir.passes.PreconditionError: a W or expert of the plan is not in
            the graph (nothing has been changed then).
    """
    passes: list[ir.passes.PassBase] = []
    if novices is not None:
        passes.append(ExpertsToNovicesPass(novices))
    passes += [NoviceBranchesToBiasPass(), cleanup_passes()]
    # Run one by one rather than in a Sequential, which would wrap a plan's
    # PreconditionError in a PassError.
    for pass_ in passes:
        model = pass_(model).model
    return model

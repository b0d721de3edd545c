"""MoNE novices: per-expert dispatch branches -> one constant bias per MoE layer.

A *novice* branch of the canonical MoE dispatch (see ``graph_passes/__init__.py``)
scatters ``w_e * C_e`` into the layer's accumulator, where ``w_e`` are the
routing weights of the tokens that selected expert ``e`` and ``C_e`` is a
constant vector.  Since ``W[t, e] == 0`` for every token that did not select
``e``, the branch adds exactly ``W[:, e:e+1] @ C_e[None]`` to the accumulator,
and all novices of a layer together add::

    MatMul(Gather(W, novice_ids, axis=1), C)        # C: [n_novices, H]

:class:`NoviceBranchesToBiasPass` rewrites the graph into that form with three
onnxscript rewrite rules (:data:`rules`), run to a fixpoint:

1. :class:`NoviceScatterToBias`: ``ScatterND(acc, idx_e, Mul(w_e, C_e), reduction="add")``
   becomes ``Add(acc, MatMul(Gather(W, [e], axis=1), C_e[None]))``; the
   NonZero/Transpose/Squeeze/Gather dispatch of the novice is removed.
2. :class:`BiasPastScatterAdd`: ``ScatterND(Add(acc, bias), i, u, reduction="add")``
   becomes ``Add(ScatterND(acc, i, u, reduction="add"), bias)`` (a scatter-add
   is linear in its data input), so bias terms move to the end of the chain.
3. :class:`MergeNoviceBiases`: two consecutive bias ``Add``s on the same ``W``
   become one, with sorted expert ids and the rows of ``C`` in the same order.

Exactness assumes what holds for routing weights: ``W >= 0`` and a zero in
``W`` where an expert is not selected (the dispatch selects ``W[:, e] > 0``;
the bias multiplies the whole column).  Up to floating-point summation order
the result is then the same function.

:class:`ExpertsToNovicesPass` turns real expert branches into novice branches
from a plan ``{W name: {expert: mean vector}}``, so that the pipeline also
works from an unpruned export.
"""

from __future__ import annotations

__all__ = [
    "BiasPastScatterAdd",
    "ExpertsToNovicesPass",
    "MergeNoviceBiases",
    "NoviceBranchesToBiasPass",
    "NoviceScatterToBias",
    "explain_novice_mismatches",
    "rules",
]

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.pattern import (
    MatchingTracer,
    MatchResult,
    MatchStatus,
    PatternBase,
    RewriteRuleClassBase,
    RewriteRuleSet,
)

from graph_passes._graph_utils import Liveness, const_array, is_onnx_op, value_names

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# The dispatch of one expert, shared by the rules and the branch finder.
# ---------------------------------------------------------------------------


def _dispatch_pattern(op, acc, W, column, zero, squeeze_axes, unsqueeze_axes, other, swap):
    """ScatterND(acc, idx_e, Mul(w_e, other)) with the canonical dispatch of column e of W.

    Attributes and constants are pattern variables, checked by
    :func:`_check_dispatch`, so that a near-miss reports *why* it is one.
    """
    col = op.Gather(W, column, _outputs=["column_weights"])
    nonzero = op.NonZero(op.Greater(col, zero))
    indices = op.Transpose(nonzero, _outputs=["scatter_indices"])
    tokens = op.Squeeze(nonzero, squeeze_axes)
    token_weights = op.Gather(col, tokens, _outputs=["token_weights"])
    w_e = op.Unsqueeze(token_weights, unsqueeze_axes)
    updates = op.Mul(other, w_e) if swap else op.Mul(w_e, other)
    return op.ScatterND(acc, indices, updates)


def _fail(reason: str, *sources: ir.Node | ir.Value | None) -> MatchResult:
    return MatchResult().fail(reason, [s for s in sources if s is not None] or None)


def _axes(value: ir.Value | None) -> list[int] | None:
    array = const_array(value)
    if array is None or array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        return None
    return [int(a) for a in array]


def _check_scatter_add(root: ir.Node) -> MatchResult:
    reduction = root.attributes.get_string("reduction", "none")
    if reduction != "add":
        return _fail(
            f"ScatterND reduction is {reduction!r}, not 'add': only an additive scatter "
            "can be moved out of the accumulation chain",
            root,
        )
    return MatchResult()


def _check_dispatch(
    root: ir.Node,
    W: ir.Value,
    column: ir.Value,
    zero: ir.Value,
    squeeze_axes: ir.Value,
    unsqueeze_axes: ir.Value,
    column_weights: ir.Value,
    token_weights: ir.Value,
    scatter_indices: ir.Value,
) -> MatchResult:
    """Everything but the updates' second operand; failures say what is off."""
    result = _check_scatter_add(root)
    if not result:
        return result
    e = const_array(column)
    if e is None:
        return _fail("the W column index of the dispatch is not a constant", column)
    if e.ndim != 0 or not np.issubdtype(e.dtype, np.integer):
        return _fail(f"the W column index is not an integer scalar (shape {e.shape})", column)
    axis = column_weights.producer().attributes.get_int("axis", 0)
    rank2 = W.shape is not None and len(W.shape) == 2
    if not (axis == 1 or (axis == -1 and rank2)):
        return _fail(f"the column Gather of W has axis={axis}, expected 1", column_weights)
    threshold = const_array(zero)
    if threshold is None:
        return _fail("the token selection threshold (Greater's 2nd input) is not a constant", zero)
    if threshold.size != 1 or threshold.ravel()[0] != 0:
        return _fail(f"tokens are selected by Greater(column, {threshold}), not > 0", zero)
    if _axes(squeeze_axes) != [0]:
        return _fail("Squeeze axes of the NonZero output are not [0]", squeeze_axes)
    if token_weights.producer().attributes.get_int("axis", 0) != 0:
        return _fail("the Gather of the selected tokens' weights is not on axis 0", token_weights)
    if _axes(unsqueeze_axes) not in ([1], [-1]):
        return _fail("the routing weights are not unsqueezed on axis 1", unsqueeze_axes)
    perm = scatter_indices.producer().attributes.get_ints("perm", None)
    if perm is not None and list(perm) != [1, 0]:
        return _fail(
            f"the scatter indices are Transpose(perm={list(perm)}), not [1, 0]", scatter_indices
        )
    return MatchResult()


def _novice_constant(other: ir.Value) -> tuple[np.ndarray | None, MatchResult]:
    c = const_array(other)
    if c is None:
        return None, _fail(
            "updates are not routing weight x constant: the other Mul operand is not a "
            "constant (a real expert, not a novice)",
            other,
        )
    if not (c.ndim == 1 or (c.ndim == 2 and c.shape[0] == 1)):
        return None, _fail(
            f"the novice constant has shape {list(c.shape)}, expected [H] or [1, H]", other
        )
    if not np.all(np.isfinite(c.astype(np.float64))):
        return None, _fail("the novice constant has non-finite entries (0 * inf is not 0)", other)
    return c.reshape(1, -1), MatchResult()


# ---------------------------------------------------------------------------
# Bias terms: MatMul(Gather(W, ids, axis=1), C)
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Bias:
    matmul: ir.Node
    gather: ir.Node
    W: ir.Value
    ids: np.ndarray  # [n] int64
    table: np.ndarray  # [n, H]


def _bias_constants(ids_value: ir.Value | None, table_value: ir.Value | None):
    ids = const_array(ids_value)
    table = const_array(table_value)
    if ids is None or table is None:
        return None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        return None
    if table.ndim != 2 or table.shape[0] != ids.shape[0]:
        return None
    return ids.astype(np.int64), table


def _as_novice_bias(value: ir.Value | None) -> _Bias | None:
    """The value as a novice bias term ``MatMul(Gather(W, ids, axis=1), C)``, or None."""
    matmul = value.producer() if value is not None else None
    if not is_onnx_op(matmul, "MatMul") or len(matmul.inputs) != 2 or matmul.inputs[0] is None:
        return None
    gather = matmul.inputs[0].producer()
    if not is_onnx_op(gather, "Gather") or gather.attributes.get_int("axis", 0) != 1:
        return None
    constants = _bias_constants(gather.inputs[1], matmul.inputs[1])
    if constants is None or gather.inputs[0] is None:
        return None
    return _Bias(matmul, gather, gather.inputs[0], *constants)


def _bias_tensors(op, ids: np.ndarray, table: np.ndarray):
    """Constant nodes (lifted to named initializers when the pass finishes)."""
    ids_value = op.Constant(value=ir.tensor(np.ascontiguousarray(ids, dtype=np.int64)))
    table_value = op.Constant(value=ir.tensor(np.ascontiguousarray(table)))
    return ids_value, table_value


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------


class NoviceScatterToBias(RewriteRuleClassBase):
    """Rule 1: one novice ScatterND -> ``Add(acc, MatMul(Gather(W, [e], axis=1), C_e[None]))``.

    ``swap`` selects the operand order of the update ``Mul`` (``Mul(C_e, w_e)``).
    """

    def __init__(self, swap: bool = False) -> None:
        super().__init__(name="NoviceScatterToBias" + ("(swapped)" if swap else ""))
        self._swap = swap

    def pattern(self, op, acc, W, column, zero, squeeze_axes, unsqueeze_axes, other):
        return _dispatch_pattern(
            op, acc, W, column, zero, squeeze_axes, unsqueeze_axes, other, self._swap
        )

    def check(self, context, W, column, zero, squeeze_axes, unsqueeze_axes, other,
              column_weights, token_weights, scatter_indices, **_) -> MatchResult:  # fmt: skip
        result = _check_dispatch(
            context.root, W, column, zero, squeeze_axes, unsqueeze_axes,
            column_weights, token_weights, scatter_indices,
        )  # fmt: skip
        if not result:
            return result
        return _novice_constant(other)[1]

    def rewrite(self, op, acc, W, column, other, **_):
        e = int(const_array(column))
        table, _ = _novice_constant(other)
        ids_value, table_value = _bias_tensors(op, np.array([e]), table)
        return op.Add(acc, op.MatMul(op.Gather(W, ids_value, axis=1), table_value))


def _shapes_conflict(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    """True only if the shapes are known to differ (symbolic dims may be equal)."""
    if a is None or b is None:
        return False
    if len(a) != len(b):
        return True
    return any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a, b))


class BiasPastScatterAdd(RewriteRuleClassBase):
    """Rule 2: move a bias past an additive scatter (which is linear in its data).

    ``ScatterND(Add(acc, bias), i, u, "add")`` -> ``Add(ScatterND(acc, i, u, "add"), bias)``;
    ``bias`` must be a novice bias term, so only this pass's own ``Add``s move.
    """

    def pattern(self, op, acc, bias, indices, updates):
        return op.ScatterND(op.Add(acc, bias), indices, updates)

    def check(self, context, acc, bias, **_) -> MatchResult:
        result = _check_scatter_add(context.root)
        if not result:
            return result
        if _as_novice_bias(bias) is None:
            return _fail(
                "the added term is not a novice bias MatMul(Gather(W, ids, axis=1), C)", bias
            )
        if _shapes_conflict(acc.shape, bias.shape):
            return _fail(
                f"bias shape {bias.shape} differs from accumulator shape {acc.shape}", bias
            )
        return MatchResult()

    def rewrite(self, op, acc, bias, indices, updates, **_):
        return op.Add(op.ScatterND(acc, indices, updates, reduction="add"), bias)


class MergeNoviceBiases(RewriteRuleClassBase):
    """Rule 3: ``Add(Add(acc, bias(W, ids1, C1)), bias(W, ids2, C2))`` -> one bias on ``W``.

    Expert ids are sorted ascending (rows of ``C`` follow); an id present in
    both terms gets the sum of its rows.
    """

    def pattern(self, op, acc, W, ids1, table1, ids2, table2):
        first = op.MatMul(op.Gather(W, ids1, axis=1), table1)
        second = op.MatMul(op.Gather(W, ids2, axis=1), table2)
        return op.Add(op.Add(acc, first), second)

    def check(self, context, ids1, table1, ids2, table2, **_) -> MatchResult:
        first = _bias_constants(ids1, table1)
        second = _bias_constants(ids2, table2)
        if first is None or second is None:
            return _fail("a bias term's expert ids / table are not matching constants", ids1, ids2)
        if first[1].dtype != second[1].dtype or first[1].shape[1] != second[1].shape[1]:
            return _fail("the two bias tables differ in dtype or width", table1, table2)
        return MatchResult()

    def rewrite(self, op, acc, W, ids1, table1, ids2, table2, **_):
        ids_a, table_a = _bias_constants(ids1, table1)
        ids_b, table_b = _bias_constants(ids2, table2)
        ids, inverse = np.unique(np.concatenate([ids_a, ids_b]), return_inverse=True)
        rows = np.concatenate([table_a, table_b]).astype(np.float64)
        merged = np.zeros((len(ids), rows.shape[1]))
        np.add.at(merged, inverse.ravel(), rows)
        ids_value, table_value = _bias_tensors(op, ids, merged.astype(table_a.dtype))
        return op.Add(acc, op.MatMul(op.Gather(W, ids_value, axis=1), table_value))


_NOVICE_RULES = (NoviceScatterToBias.rule(), NoviceScatterToBias.rule(swap=True))
#: The three rules of :class:`NoviceBranchesToBiasPass` (both ``Mul`` orders of rule 1).
rules = RewriteRuleSet([*_NOVICE_RULES, BiasPastScatterAdd.rule(), MergeNoviceBiases.rule()])


def _node_label(node: ir.Node) -> str:
    return node.outputs[0].name or node.name or str(node)


def explain_novice_mismatches(model: ir.Model) -> dict[str, str]:
    """Why each ScatterND of the main graph is not a novice branch.

    Returns ``{ScatterND output name (or node name): reason}`` for every
    ScatterND that :class:`NoviceScatterToBias` does not match, with the
    reason of the best (deepest) of the two ``Mul`` orders.  A real expert
    branch reads "... the other Mul operand is not a constant ...".  Does not
    modify the model.
    """
    graph = model.graph
    reasons: dict[str, str] = {}
    for node in graph:
        if not is_onnx_op(node, "ScatterND"):
            continue
        # Pattern.match returns None when a check fails; the tracer keeps the reason.
        # Checks first (without the "matched nodes are removable" test, which the
        # matcher runs before them), so that a real expert reads as one.
        tracer = MatchingTracer()
        for rule in _NOVICE_RULES:
            rule.match(model, graph, node, check_nodes_are_removable=False, tracer=tracer)
        scored = [
            (info.score(), i, rule, info)
            for i, (rule, infos) in enumerate(tracer.best_matches_map.items())
            for info in infos
        ]
        if not scored:
            reasons[_node_label(node)] = "no part of the novice pattern matches"
            continue
        _, _, rule, best = max(scored, key=lambda item: (item[0], -item[1]))
        if best.status != MatchStatus.SUCCESS:
            reasons[_node_label(node)] = best.match_result.reason
            continue
        match = rule.match(model, graph, node)
        if not match:
            reasons[_node_label(node)] = match.reason
    return reasons


# ---------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------


def _constant_annotations(model: ir.Model):
    """What the rewriter's constant propagation sets on Constant outputs (to undo it)."""
    nodes = [*model.graph, *(n for f in model.functions.values() for n in f)]
    return [
        (out, out.const_value, out.type, out.shape)
        for node in nodes
        if is_onnx_op(node, "Constant")
        for out in node.outputs
    ]


def _restore_annotations(annotations) -> None:
    for value, const_value, type_, shape in annotations:
        value.const_value = const_value
        value.type = type_
        value.shape = shape


class NoviceBranchesToBiasPass(ir.passes.InPlacePass):
    """Replace every layer's novice branches by one constant bias node.

    For each distinct routing-weight value ``W`` whose accumulation chain has
    novice branches, the graph ends up with exactly one
    ``Add(acc_final, MatMul(Gather(W, novice_ids, axis=1), C))`` where
    ``novice_ids`` (int64, ascending) and ``C`` ([n_novices, H], the model
    dtype) are initializers named ``f"{W.name}.novice_ids"`` and
    ``f"{W.name}.novice_bias"`` (``.1``, ``.2``, ... appended on a clash).
    The novices' dispatch nodes are removed, and so is whatever only they
    used (their ``C_e``); nothing else is touched.

    A bias is never moved past a scatter that is not additive (it would not
    be exact), so a chain interrupted by one gets one bias per segment.  Bias
    initializers are created in the main graph (the rules also run inside
    model-local functions, where the biases stay ``Constant`` nodes).

    Args:
        max_iterations: bound on the rewrite fixpoint loop (each iteration is
            one sweep of :data:`rules` over the graph).
    """

    def __init__(self, max_iterations: int = 16) -> None:
        super().__init__()
        self.max_iterations = max_iterations

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        liveness = Liveness(graph)
        existing_nodes = set(graph)
        annotations = _constant_annotations(model)

        count = 0
        for _ in range(self.max_iterations):
            applied = rules.apply_to_model(model)
            count += applied
            if not applied:
                break
        else:
            logger.warning(
                "NoviceBranchesToBiasPass: no fixpoint after %s sweeps", self.max_iterations
            )

        if not count:
            _restore_annotations(annotations)
            if logger.isEnabledFor(logging.DEBUG):
                for name, reason in explain_novice_mismatches(model).items():
                    logger.debug("ScatterND %s is not a novice branch: %s", name, reason)
            return ir.passes.PassResult(model, modified=False)

        liveness.remove_newly_dead(graph)
        self._name_new_biases(graph, existing_nodes)
        liveness.remove_newly_dead(graph)
        logger.info("NoviceBranchesToBiasPass: %s rewrites", count)
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _name_new_biases(graph: ir.Graph, existing_nodes: set[ir.Node]) -> None:
        """Lift the new biases' Constant nodes into deterministically named initializers."""
        taken = value_names(graph)
        for node in list(graph):
            if node in existing_nodes or not is_onnx_op(node, "MatMul"):
                continue
            bias = _as_novice_bias(node.outputs[0])
            if bias is None:
                continue
            base = bias.W.name or "routing_weights"
            suffix, k = "", 0
            while f"{base}.novice_ids{suffix}" in taken or f"{base}.novice_bias{suffix}" in taken:
                k += 1
                suffix = f".{k}"
            ids_init = ir.val(
                f"{base}.novice_ids{suffix}",
                const_value=ir.tensor(bias.ids, name=f"{base}.novice_ids{suffix}"),
            )
            table_init = ir.val(
                f"{base}.novice_bias{suffix}",
                const_value=ir.tensor(bias.table, name=f"{base}.novice_bias{suffix}"),
            )
            for init in (ids_init, table_init):
                graph.register_initializer(init)
                taken.add(init.name)
            bias.gather.replace_input_with(1, ids_init)
            bias.matmul.replace_input_with(1, table_init)
            logger.info(
                "%s: %s novices -> bias %s %s",
                base,
                len(bias.ids),
                table_init.name,
                list(bias.table.shape),
            )


class _ExpertBranch(PatternBase):
    """The canonical dispatch branch of one expert, real or novice (match only)."""

    def __init__(self, swap: bool) -> None:
        super().__init__(name="ExpertBranch" + ("(swapped)" if swap else ""))
        self._swap = swap

    def pattern(self, op, acc, W, column, zero, squeeze_axes, unsqueeze_axes, other):
        return _dispatch_pattern(
            op, acc, W, column, zero, squeeze_axes, unsqueeze_axes, other, self._swap
        )

    def check(self, context, W, column, zero, squeeze_axes, unsqueeze_axes,
              column_weights, token_weights, scatter_indices, **_) -> MatchResult:  # fmt: skip
        return _check_dispatch(
            context.root, W, column, zero, squeeze_axes, unsqueeze_axes,
            column_weights, token_weights, scatter_indices,
        )  # fmt: skip


_BRANCH_PATTERNS = (_ExpertBranch(swap=False), _ExpertBranch(swap=True))


@dataclasses.dataclass
class _Branch:
    W: ir.Value
    expert: int
    mul: ir.Node
    other_index: int  # input of ``mul`` that is the expert output (or C_e)
    dtype: ir.DataType  # of W (from the constant 0 it is compared with)


def _find_branches(model: ir.Model) -> tuple[dict[tuple[str, int], _Branch], list[str]]:
    """All canonical expert branches of the main graph, keyed by (W name, expert)."""
    graph = model.graph
    branches: dict[tuple[str, int], _Branch] = {}
    duplicates: list[str] = []
    for node in graph:
        if not is_onnx_op(node, "ScatterND"):
            continue
        for pattern in _BRANCH_PATTERNS:
            match = pattern.match(model, graph, node, check_nodes_are_removable=False)
            if match:
                break
        else:
            continue
        bindings = match.bindings
        W, other = bindings["W"], bindings["other"]
        key = (W.name or "", int(const_array(bindings["column"])))
        mul = node.inputs[2].producer()
        zero = const_array(bindings["zero"])
        branch = _Branch(
            W, key[1], mul, list(mul.inputs).index(other), ir.DataType.from_numpy(zero.dtype)
        )
        if key in branches:
            duplicates.append(f"W {key[0]!r} expert {key[1]}")
        branches[key] = branch
    return branches, duplicates


def _find_bias_rows(graph: ir.Graph) -> dict[tuple[str, int], np.ndarray]:
    """Experts already folded into a novice bias: (W name, expert) -> row of C."""
    rows: dict[tuple[str, int], np.ndarray] = {}
    for node in graph:
        if is_onnx_op(node, "MatMul"):
            bias = _as_novice_bias(node.outputs[0])
            if bias is not None:
                for expert, row in zip(bias.ids.tolist(), bias.table):
                    rows[(bias.W.name or "", expert)] = row
    return rows


class ExpertsToNovicesPass(ir.passes.InPlacePass):
    """Turn real expert branches into novice branches, from a pruning plan.

    Args:
        novices: ``{W value name: {expert index: mean vector [H]}}``. The
            branch of expert ``e`` on routing weights ``W`` gets its update
            ``Mul(y_e, w_e)`` replaced by ``Mul(w_e, C_e)`` with ``C_e`` a new
            initializer ``f"{W}.experts.{e}.novice"`` holding the vector in
            W's dtype.  The expert's subgraph and weights, now unused, are
            removed.  A branch that already is a novice with the same vector is
            left alone, and so is an expert that :class:`NoviceBranchesToBiasPass`
            already folded into W's bias with the same vector (so a second run,
            also of the whole pipeline, changes nothing).

    Raises:
        PreconditionError: (before changing anything) a named W or one of
            its expert branches is not in the graph in the canonical form, or
            an expert is already in W's novice bias with another vector.
    """

    def __init__(self, novices: Mapping[str, Mapping[int, np.ndarray]]) -> None:
        super().__init__()
        plan: dict[str, dict[int, np.ndarray]] = {}
        for w_name, experts in novices.items():
            for expert, vector in experts.items():
                array = np.asarray(vector)
                if array.ndim == 2 and array.shape[0] == 1:
                    array = array[0]
                if array.ndim != 1:
                    raise ValueError(
                        f"novice {w_name!r}[{expert}] must be a vector [H], got {array.shape}"
                    )
                if not np.all(np.isfinite(array.astype(np.float64))):
                    raise ValueError(f"novice {w_name!r}[{expert}] has non-finite entries")
                plan.setdefault(str(w_name), {})[int(expert)] = array
        self.novices = plan

    def requires(self, model: ir.Model) -> None:
        branches, duplicates = _find_branches(model)
        bias_rows = _find_bias_rows(model.graph)
        problems = [f"{d} has more than one dispatch branch" for d in duplicates]
        names = value_names(model.graph)
        for w_name, experts in sorted(self.novices.items()):
            if w_name not in names:
                problems.append(f"no value named {w_name!r} (routing weights W)")
                continue
            found = sorted(e for (w, e) in branches if w == w_name)
            for expert, vector in sorted(experts.items()):
                key = (w_name, expert)
                if key in branches:
                    continue
                if key not in bias_rows:
                    problems.append(
                        f"W {w_name!r}: no canonical dispatch branch for expert {expert} "
                        f"(found experts {found})"
                    )
                elif not np.array_equal(bias_rows[key], vector.astype(bias_rows[key].dtype)):
                    problems.append(
                        f"W {w_name!r}: expert {expert} is already in the novice bias "
                        "with a different vector"
                    )
        if problems:
            raise ir.passes.PreconditionError("ExpertsToNovicesPass: " + "; ".join(problems))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        liveness = Liveness(graph)
        branches, _ = _find_branches(model)
        taken = value_names(graph)
        modified = False
        for w_name, experts in sorted(self.novices.items()):
            for expert, vector in sorted(experts.items()):
                branch = branches.get((w_name, expert))
                if branch is None:  # already in W's bias (checked by requires)
                    continue
                array = vector.astype(branch.dtype.numpy())
                current = const_array(branch.mul.inputs[branch.other_index])
                if current is not None and np.array_equal(current.reshape(-1), array):
                    continue
                name, k = f"{w_name}.experts.{expert}.novice", 0
                while name in taken:
                    k += 1
                    name = f"{w_name}.experts.{expert}.novice.{k}"
                taken.add(name)
                init = ir.val(name, const_value=ir.tensor(array, name=name))
                graph.register_initializer(init)
                branch.mul.replace_input_with(branch.other_index, init)
                modified = True
        if modified:
            liveness.remove_newly_dead(graph)
        return ir.passes.PassResult(model, modified=modified)

"""A synthetic MoE model in the canonical dispatch form, for the graph-pass tests.

Like onnxscript's ``rewriter/models/_smollm_1.py``: a small model that lives in
code.  :func:`build_moe_model` returns an ``ir.Model`` with ``num_layers`` MoE
layers (residual ``h = h + moe(h)``), each with a softmax top-k router
(renormalised), a dense routing-weight matrix ``W = ScatterElements(zeros,
topk_idx, topk_w)`` and, per expert, the dispatch described in
``graph_passes/__init__.py``.  Real experts are SwiGLU MLPs with random
weights; novices add ``w_e * C_e``.  Everything is seeded, so two builds with
the same arguments are byte-identical and real experts get the same weights
whether or not other experts are novices.

Not a test module (pytest collects ``*_test.py`` only).
"""

from __future__ import annotations

__all__ = [
    "NEAR_MISSES",
    "SyntheticMoE",
    "build_moe_model",
    "routing_weights_name",
    "expert_weight_names",
    "op_counts",
    "run_ort",
    "run_reference",
    "tokens_routed_to",
]

import collections
import dataclasses
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx_ir as ir

# Variations of one novice branch that the bias pass must *not* rewrite.
NEAR_MISSES = ("reduction_none", "update_not_constant", "column_not_constant")


def routing_weights_name(layer: int) -> str:
    return f"layers.{layer}.moe.routing_weights"


def expert_weight_names(layer: int, expert: int) -> tuple[str, str, str]:
    prefix = f"layers.{layer}.moe.experts.{expert}"
    return (f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight")


@dataclasses.dataclass
class SyntheticMoE:
    model: ir.Model
    hidden: int
    num_experts: int
    top_k: int
    router_weights: list[np.ndarray]  # per layer, [H, E] float32
    novice_means: dict[str, dict[int, np.ndarray]]  # W name -> expert -> [H]
    expert_means: dict[str, dict[int, np.ndarray]]  # a plausible mean for every expert


class _Builder:
    def __init__(self, dtype: ir.DataType) -> None:
        self.tape = ir.tape.Tape()
        self.dtype = dtype
        self._count = 0

    def op(self, op_type, inputs, attributes=None, *, name: str | None = None, outputs: int = 1):
        self._count += 1
        if outputs == 1:
            out = ir.Value(name=name or f"v{self._count}")
            return self.tape.op(op_type, inputs, attributes, output=out, name=f"n{self._count}")
        values = [ir.Value(name=f"v{self._count}_{i}") for i in range(outputs)]
        return self.tape.op_multi_out(
            op_type, inputs, attributes, outputs=values, name=f"n{self._count}"
        )

    def init(self, name: str, array: np.ndarray) -> ir.Value:
        return self.tape.initializer(ir.tensor(array, name=name), name=name)


def build_moe_model(
    *,
    num_layers: int = 2,
    hidden: int = 8,
    ffn: int = 16,
    num_experts: int = 4,
    top_k: int = 2,
    novices: Sequence[Collection[int] | Mapping[int, np.ndarray]] = (),
    dtype: type = np.float32,
    seed: int = 0,
    near_misses: Mapping[tuple[int, int], str] | None = None,
    constant_nodes: bool = False,
) -> SyntheticMoE:
    """Build the canonical MoE graph.

    Args:
        novices: per layer, the experts that are novices (their mean vector is
            drawn from the seeded generator) or a mapping expert -> mean vector.
        dtype: ``np.float32`` or ``np.float16``: hidden states, expert weights,
            routing weights and novice constants (the router itself runs in
            float32 and its weights are cast, as exporters do for fp16).
        near_misses: ``(layer, expert) -> kind``, kind one of
            :data:`NEAR_MISSES`: that novice branch is built slightly off the
            canonical form ("reduction_none" changes the model's values, the
            other two compute the same values as the canonical branch).
        constant_nodes: put the small constants (column indices, 0.0, axes)
            in ``Constant`` nodes instead of initializers.
    """
    near_misses = dict(near_misses or {})
    np_dtype = np.dtype(dtype)
    ir_dtype = ir.DataType.from_numpy(np_dtype)
    rng = np.random.default_rng(seed)
    b = _Builder(ir_dtype)

    def small_const(name: str, array: np.ndarray) -> ir.Value:
        if constant_nodes:
            return b.op("Constant", [], {"value": ir.tensor(array)}, name=name)
        return b.init(name, array)

    x = ir.val("hidden_states", ir_dtype, ["T", hidden])
    h = x
    router_weights: list[np.ndarray] = []
    novice_means: dict[str, dict[int, np.ndarray]] = {}
    expert_means: dict[str, dict[int, np.ndarray]] = {}
    for layer in range(num_layers):
        p = f"layers.{layer}.moe"
        layer_novices = novices[layer] if layer < len(novices) else ()
        # Draw everything for this layer up front, in a fixed order.
        wr = rng.standard_normal((hidden, num_experts)).astype(np.float32)
        weights = [
            (
                (rng.standard_normal((hidden, ffn)) / np.sqrt(hidden)).astype(np_dtype),
                (rng.standard_normal((hidden, ffn)) / np.sqrt(hidden)).astype(np_dtype),
                (rng.standard_normal((ffn, hidden)) / np.sqrt(ffn)).astype(np_dtype),
            )
            for _ in range(num_experts)
        ]
        means = {e: rng.standard_normal(hidden).astype(np_dtype) for e in range(num_experts)}
        if isinstance(layer_novices, Mapping):
            means.update({e: np.asarray(v, dtype=np_dtype) for e, v in layer_novices.items()})
        router_weights.append(wr)

        # Router: float32 softmax top-k, renormalised, scattered into a dense [T, E].
        hf = h if np_dtype == np.float32 else b.op("Cast", [h], {"to": ir.DataType.FLOAT})
        logits = b.op("MatMul", [hf, b.init(f"{p}.gate.weight", wr)], name=f"{p}.router_logits")
        probs = b.op("Softmax", [logits], {"axis": -1})
        k = b.init(f"{p}.top_k", np.array([top_k], dtype=np.int64))
        topv, topi = b.op("TopK", [probs, k], {"axis": -1}, outputs=2)
        norm = b.op(
            "ReduceSum", [topv, b.init(f"{p}.sum_axes", np.array([-1], np.int64))], {"keepdims": 1}
        )
        topv = b.op("Div", [topv, norm])
        zeros = b.op(
            "ConstantOfShape",
            [b.op("Shape", [logits])],
            {"value": ir.tensor(np.zeros(1, np.float32))},
        )
        w_name = routing_weights_name(layer)
        if np_dtype == np.float32:
            w = b.op("ScatterElements", [zeros, topi, topv], {"axis": 1}, name=w_name)
        else:
            w32 = b.op("ScatterElements", [zeros, topi, topv], {"axis": 1})
            w = b.op("Cast", [w32], {"to": ir_dtype}, name=w_name)

        acc = b.op(
            "ConstantOfShape",
            [b.op("Shape", [h])],
            {"value": ir.tensor(np.zeros(1, np_dtype))},
            name=f"{p}.acc_init",
        )
        zero = small_const(f"{p}.zero", np.array(0, dtype=np_dtype))
        axes0 = small_const(f"{p}.axes0", np.array([0], np.int64))
        axes1 = small_const(f"{p}.axes1", np.array([1], np.int64))
        expert_means[w_name] = dict(means)
        for e in range(num_experts):
            q = f"{p}.experts.{e}"
            miss = near_misses.get((layer, e))
            if miss != "column_not_constant":
                e_const = small_const(f"{q}.index", np.array(e, np.int64))
            else:
                # e computed at run time as E - (E - e): same value, not a constant.
                width = b.op("Gather", [b.op("Shape", [w]), axes1], {"axis": 0})
                e_const = b.op(
                    "Squeeze",
                    [b.op("Sub", [width, b.init(f"{q}.offset", np.array([num_experts - e]))])],
                )
            col = b.op("Gather", [w, e_const], {"axis": 1}, name=f"{q}.col")
            sel = b.op("Greater", [col, zero])
            nz = b.op("NonZero", [sel], name=f"{q}.nonzero")
            idx = b.op("Transpose", [nz], {"perm": [1, 0]}, name=f"{q}.scatter_idx")
            tok = b.op("Squeeze", [nz, axes0], name=f"{q}.tokens")
            w_e = b.op("Unsqueeze", [b.op("Gather", [col, tok], {"axis": 0}), axes1])
            is_novice = e in layer_novices
            if is_novice:
                novice_means.setdefault(w_name, {})[e] = means[e]
                c = b.init(f"{q}.novice", means[e])
                if miss == "update_not_constant":
                    # C_e * 1 where the 1 is computed: not a constant.
                    one = b.op("Div", [w_e, w_e])  # [n, 1] of ones
                    c = b.op("Mul", [one, c])
                operands = [w_e, c] if e % 2 == 0 else [c, w_e]
            else:
                wg, wu, wd = (
                    b.init(n, a) for n, a in zip(expert_weight_names(layer, e), weights[e])
                )
                xe = b.op("Gather", [h, tok], {"axis": 0})
                g = b.op("MatMul", [xe, wg])
                u = b.op("MatMul", [xe, wu])
                act = b.op("Mul", [g, b.op("Sigmoid", [g])])
                ye = b.op("MatMul", [b.op("Mul", [act, u]), wd], name=f"{q}.out")
                operands = [ye, w_e] if e % 2 == 0 else [w_e, ye]
            upd = b.op("Mul", operands, name=f"{q}.update")
            reduction = "none" if miss == "reduction_none" else "add"
            acc = b.op(
                "ScatterND", [acc, idx, upd], {"reduction": reduction}, name=f"{p}.acc.{e}"
            )
        h = b.op("Add", [h, acc], name=f"layers.{layer}.out")

    out = b.op("Identity", [h], name="output")
    out.dtype = ir_dtype
    out.shape = ir.Shape(["T", hidden])
    graph = ir.Graph(
        [x],
        [out],
        nodes=b.tape.nodes,
        initializers=b.tape.initializers,
        opset_imports={"": 18},
        name="synthetic_moe",
    )
    model = ir.Model(graph, ir_version=10, producer_name="graph_passes tests")
    return SyntheticMoE(
        model, hidden, num_experts, top_k, router_weights, novice_means, expert_means
    )


def tokens_routed_to(
    moe: SyntheticMoE, experts_per_token: Sequence[Collection[int]], layer: int = 0
) -> np.ndarray:
    """Hidden states whose layer-``layer`` router picks exactly the given experts.

    Solves ``x @ Wr = logits`` with logits +4 on the wanted experts and -4
    elsewhere (needs hidden >= num_experts), so token t is routed to
    ``experts_per_token[t]`` (which must have ``top_k`` entries).
    """
    wr = moe.router_weights[layer]
    rows = []
    for chosen in experts_per_token:
        if len(chosen) != moe.top_k:
            raise ValueError(f"each token needs exactly top_k={moe.top_k} experts")
        logits = np.full(moe.num_experts, -4.0)
        logits[list(chosen)] = 4.0 + 0.1 * np.arange(len(chosen))
        rows.append(np.linalg.lstsq(wr.T, logits, rcond=None)[0])
    return np.asarray(rows, dtype=np.float32)


def run_ort(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """Run the model on CPUExecutionProvider and return its one output."""
    import onnxruntime as ort  # optional dependency: tests only

    proto = ir.serde.serialize_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    # Keep ORT's own graph optimisations out of the comparison.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"hidden_states": x})[0]


def run_reference(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """Run the model with ONNX's reference evaluator.

    For fp16: ORT's CPU ScatterND has no float16 kernel for reduction="add".
    """
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(ir.serde.serialize_model(model))
    return evaluator.run(None, {"hidden_states": x})[0]


def op_counts(model: ir.Model) -> collections.Counter[str]:
    """How many nodes of each op type the main graph has."""
    return collections.Counter(node.op_type for node in model.graph)

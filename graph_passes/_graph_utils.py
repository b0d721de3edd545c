"""Small helpers shared by the passes in this package (not public API)."""

from __future__ import annotations

__all__ = [
    "ONNX_DOMAINS",
    "Liveness",
    "const_array",
    "is_onnx_op",
    "value_names",
]

import numpy as np
import onnx_ir as ir

ONNX_DOMAINS = frozenset({"", "ai.onnx"})


def is_onnx_op(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ONNX_DOMAINS


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as a numpy array if it is a constant (initializer or Constant node)."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    try:
        return tensor.numpy()
    except Exception:  # noqa: BLE001 - e.g. external data that is not reachable
        return None


def value_names(graph: ir.Graph) -> set[str]:
    """Names of all values of the (main) graph: inputs, initializers, node outputs."""
    names = {v.name for v in graph.inputs if v.name}
    names.update(graph.initializers)
    for node in graph:
        names.update(v.name for v in node.outputs if v.name)
    return names


def _is_dead(node: ir.Node, graph_outputs: frozenset[ir.Value]) -> bool:
    return all(not out.uses() and out not in graph_outputs for out in node.outputs)


class Liveness:
    """What is dead before a pass runs, so that the pass removes only what *it* killed.

    A pass that rewires a subgraph leaves the old producers without consumers.
    :meth:`remove_newly_dead` removes those (and the initializers only they
    used) but keeps dead code that was already there: a pass that does not
    fire must leave the graph exactly as it was.
    """

    def __init__(self, graph: ir.Graph) -> None:
        outputs = frozenset(graph.outputs)
        self._dead_nodes = {node for node in graph if _is_dead(node, outputs)}
        self._unused_initializers = {
            name for name, value in graph.initializers.items() if not value.uses()
        }

    def remove_newly_dead(self, graph: ir.Graph) -> int:
        """Remove nodes and initializers that became unused; return how many."""
        outputs = frozenset(graph.outputs)
        count = 0
        for node in reversed(graph):
            if node not in self._dead_nodes and _is_dead(node, outputs):
                graph.remove(node, safe=True)
                count += 1
        for name, value in list(graph.initializers.items()):
            if (
                name not in self._unused_initializers
                and not value.uses()
                and not value.is_graph_input()
                and not value.is_graph_output()
            ):
                del graph.initializers[name]
                count += 1
        return count

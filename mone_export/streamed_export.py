"""ONNX export of a model larger than memory: one decoder layer traced at a time, the pieces stitched into one graph.

:func:`export_onnx_streamed` writes the same decoder as :func:`mone_export.export.export_onnx` (the contract of
docs/graph.md: inputs, outputs and their names, KV cache, novices as one bias per layer, no pruned weight) from a
:class:`~mone_export.streaming.LayerStreamedModel`, with only one decoder layer's weights in memory.

How, per decoder layer ``i``:

1. load it from the checkpoint and prune it as the plan says (``LayerStreamedModel.loaded_layer(index, plan)``);
2. trace a *piece*: the model's own forward with every other decoder layer replaced by a pass-through, so the
   graph is the prologue (embedding, attention mask, rotary embeddings), layer ``i`` and, for the last piece, the
   epilogue (final norm, LM head). Layer ``i`` sits at its own index, so its node scopes, parameter names,
   ``past_key_values.{i}`` / ``present.{i}`` names and cache slot are those of the whole-model export. A piece
   after the first reads its hidden states from a graph input, a piece before the last returns its layer's output;
   a middle piece starts from ``inputs_embeds`` instead of ``input_ids``, so it holds no embedding table;
3. run on the piece exactly what the whole-model export runs after its trace (initializer naming, the graph
   passes, half-precision storage: :func:`mone_export.export.process_traced_graph`);
4. cut out the layer's nodes (the nodes in the layer's TorchScript scope, with the unscoped constants only they
   read), append its weights to ``model.onnx.data`` and release the layer.

The first piece also gives the prologue and the last piece the epilogue. A value a later piece reads from its
prologue (the mask, the rotary ``cos`` / ``sin``) is matched to the first piece's by its structure (the operators,
attributes and constants that compute it from the graph inputs, a middle piece's ``inputs_embeds`` standing for
the first piece's embedding output), not by a name that could differ between traces; a value the first piece does
not compute (one only the epilogue reads) comes from the piece's own prologue, computed from the same graph
inputs: never a silent mis-wiring. The graph is then serialised with its weights already in place in the external
data file, so nothing is copied twice and no piece outlives its layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import io
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from mone_export.errors import UsageError
from mone_export.streaming import only_layer

__all__ = ["export_onnx_streamed"]

logger = logging.getLogger(__name__)

HIDDEN_IN = "hidden_states_in"
"""Graph input of a piece after the first: the previous decoder layer's output."""
HIDDEN_OUT = "hidden_states_out"
"""Graph output of a piece before the last: its decoder layer's output."""
INPUTS_EMBEDS = "inputs_embeds"
"""Graph input of a middle piece in place of ``input_ids``: the token embeddings (so it holds no embedding table)."""
EXTERNAL_THRESHOLD_BYTES = 1024
"""Initializers of at least this many bytes go to ``model.onnx.data`` (as :func:`mone_export.onnx_utils.save_model`)."""
_SMALL_ELEMENTS = 1 << 16
"""Initializers up to this many elements are matched by content, larger ones (weights) by name, shape and dtype."""


class _LayerPiece(nn.Module):
    """The traced function of one piece: ``(input_ids | inputs_embeds, attention_mask, position_ids, past.{i}.key,
    past.{i}.value [, hidden_in]) -> ([logits,] present.{i}.key, present.{i}.value [, hidden_out])``.

    The model runs its own forward (mask, rotary embeddings, ...) on a cache whose every slot holds layer ``i``'s
    past, so that layer ``i`` reads its own and the past length the mask needs is the same; the decoder layers
    other than ``i`` are pass-throughs (:func:`~mone_export.streaming.only_layer`).
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, index: int, hidden_in: bool, hidden_out: bool,
                 logits: bool, embeds_in: bool = False):
        super().__init__()
        from mone_export.export import cache_shapes

        self.model = model
        self.index = index
        self.spec = cache_shapes(model.config)[index]
        self.num_layers = len(layers)
        self.flags = (hidden_in, hidden_out, logits)
        self.embeds_in = embeds_in
        self._layer = [layers[index]]  # a list: not a submodule, its scope stays the model's own

    def forward(self, tokens, attention_mask, position_ids, key, value, hidden_in=None):
        from transformers import DynamicCache

        from mone_export.export import pack_mla, unpack_mla

        wants_hidden_in, wants_hidden_out, wants_logits = self.flags
        past = unpack_mla(key, value, *self.spec.mla) if self.spec.mla else (key, value)
        cache = DynamicCache(ddp_cache_data=[past] * self.num_layers)
        captured = {}

        def replace_input(module, args, kwargs):
            if args:
                return (hidden_in, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden_in}

        def keep_output(module, args, kwargs, output):
            # The rest of the forward gets an alias: the tracer maps a tensor to the last value computed "into" it,
            # and a no-op ``.to(float32)`` in the final norm would otherwise become the layer's output.
            if isinstance(output, (tuple, list)):
                captured["hidden"] = output[0]
                return (output[0].detach(), *output[1:])
            captured["hidden"] = output
            return output.detach()

        layer = self._layer[0]
        handles = [layer.register_forward_hook(keep_output, with_kwargs=True)] if wants_hidden_out else []
        if wants_hidden_in:
            handles.append(layer.register_forward_pre_hook(replace_input, with_kwargs=True))
        try:
            first = {"inputs_embeds" if self.embeds_in else "input_ids": tokens}
            out = self.model(**first, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                             use_cache=True, return_dict=True)
        finally:
            for handle in handles:
                handle.remove()
        slot = out.cache.layers[self.index]
        present = list(pack_mla(slot.keys, slot.values) if self.spec.mla else (slot.keys, slot.values))
        outputs = ([out.logits] if wants_logits else []) + present
        if wants_hidden_out:
            outputs.append(captured["hidden"])
        return tuple(outputs)


@dataclasses.dataclass(frozen=True)
class _PieceNames:
    inputs: list[str]
    outputs: list[str]
    axes: dict[str, dict[int, str]]


def _piece_names(index: int, hidden_in: bool, hidden_out: bool, logits: bool, embeds_in: bool = False) -> _PieceNames:
    from mone_export.export import BATCH, SEQ, dynamic_axes

    kinds = ("key", "value")
    first = INPUTS_EMBEDS if embeds_in else "input_ids"
    inputs = [first, "attention_mask", "position_ids", *(f"past_key_values.{index}.{k}" for k in kinds)]
    outputs = ["logits"] if logits else []
    outputs += [f"present.{index}.{k}" for k in kinds]
    every = {**dynamic_axes(index + 1), INPUTS_EMBEDS: {0: BATCH, 1: SEQ}}
    axes = {name: every[name] for name in [*inputs, *outputs]}
    if hidden_in:
        inputs.append(HIDDEN_IN)
        axes[HIDDEN_IN] = {0: BATCH, 1: SEQ}
    if hidden_out:
        outputs.append(HIDDEN_OUT)
        axes[HIDDEN_OUT] = {0: BATCH, 1: SEQ}
    return _PieceNames(inputs, outputs, axes)


def _trace_piece(model: nn.Module, layers: nn.ModuleList, index: int, path, opset: int,
                 moe_form: str = "dispatch", embeds_in: bool = False) -> None:
    """Trace piece ``index`` (module docstring) of the loaded, pruned ``model`` into the file ``path``; with
    ``embeds_in``, from the token embeddings instead of the token ids."""
    from mone_export.export import example_inputs, model_dtype, trace_module_to_onnx

    last = index == len(layers) - 1
    hidden_in, hidden_out, logits = index > 0, not last, last
    ids, mask, positions, cache = example_inputs(model)
    gen = torch.Generator().manual_seed(index)
    hidden_size = int(model.config.hidden_size)
    tokens = torch.randn(*ids.shape, hidden_size, generator=gen).to(model_dtype(model)) if embeds_in else ids
    args = [tokens, mask, positions, cache[2 * index], cache[2 * index + 1]]
    if hidden_in:
        args.append(torch.randn(*ids.shape, hidden_size, generator=gen).to(model_dtype(model)))
    names = _piece_names(index, hidden_in, hidden_out, logits, embeds_in)
    with only_layer(layers, index):
        wrapper = _LayerPiece(model, layers, index, hidden_in, hidden_out, logits, embeds_in)
        trace_module_to_onnx(model, wrapper, tuple(args), path, opset, names.inputs, names.outputs, names.axes,
                             moe_form)


# --- structure of values, to match a piece's prologue values with the first piece's -----------------------------


def _tensor_digest(tensor) -> bytes:
    return hashlib.blake2b(tensor.tobytes(), digest_size=16).digest()


def _initializer_key(value) -> tuple:
    tensor = value.const_value
    shape = tuple(int(d) for d in tensor.shape.numpy())
    if tensor.size <= _SMALL_ELEMENTS:
        return ("constant", int(tensor.dtype), shape, _tensor_digest(tensor))
    return ("weight", value.name, int(tensor.dtype), shape)


def _attribute_key(attr) -> tuple:
    import onnx_ir as ir

    if attr.type == ir.AttributeType.TENSOR:
        return (attr.name, "tensor", _initializer_key(ir.Value(name="", const_value=attr.value)))
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        raise _Unmatched(f"attribute {attr.name} holds a subgraph")
    value = attr.value
    return (attr.name, int(attr.type), tuple(value) if isinstance(value, (list, tuple)) else value)


_PAST = re.compile(r"^past_key_values\.\d+\.")


class _Unmatched(Exception):
    """A value of a piece that has no counterpart in the stitched graph."""


def _digest(*parts) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


class _Structure:
    """Structural digests of a graph's values: equal digests compute the same tensor from the graph inputs.

    A graph input is known by its name (or by the digests of the value it stands for: a middle piece's
    ``inputs_embeds`` is the first piece's token embeddings), an initializer by its content (small) or name (weights),
    a node output by its operator, attributes, the digests of its inputs and its output index. What a ``Shape``
    reads is known up to which layer's past it comes from: every piece's prologue takes the past length from its
    own layer's cache, and all layers' caches have the same shape (so the mask the first piece computes from layer
    0's past is the mask every layer reads). Any other use of a past tensor stays exact: layer ``i`` never reads
    layer 0's cache values.
    """

    def __init__(self, inputs: dict[str, tuple[bytes, bytes]] | None = None):
        self._digests: dict[int, tuple[bytes, bytes]] = {}  # id(value) -> (exact, past-insensitive)
        self._inputs = inputs or {}  # graph input name -> the digests of the value it stands for

    def pair(self, value) -> tuple[bytes, bytes]:
        """The exact and the past-insensitive digests of ``value``."""
        return self._pair(value)

    def key(self, value) -> bytes:
        """The exact structural digest of ``value``."""
        return self._pair(value)[0]

    def _pair(self, value) -> tuple[bytes, bytes]:
        stack = [value]
        while stack:
            current = stack[-1]
            if id(current) in self._digests:
                stack.pop()
                continue
            node = current.producer()
            if node is None:
                self._digests[id(current)] = self._leaf(current)
                stack.pop()
                continue
            pending = [v for v in node.inputs if v is not None and id(v) not in self._digests]
            if pending:
                stack.extend(pending)
                continue
            attrs = tuple(sorted(_attribute_key(a) for a in node.attributes.values()))
            pairs = [(None, None) if v is None else self._digests[id(v)] for v in node.inputs]
            loose = tuple(p[1] for p in pairs)
            exact = loose if node.op_type == "Shape" else tuple(p[0] for p in pairs)
            head = (node.domain, node.op_type, node.overload, attrs)
            for index, output in enumerate(node.outputs):
                self._digests[id(output)] = (_digest(head, exact, index), _digest(head, loose, index))
            stack.pop()
        return self._digests[id(value)]

    def _leaf(self, value) -> tuple[bytes, bytes]:
        if value.const_value is not None:
            key = _digest(_initializer_key(value))
            return key, key
        if value.is_graph_input() and value.name in self._inputs:
            return self._inputs[value.name]
        if value.is_graph_input():
            return _digest("input", value.name), _digest("input", _PAST.sub("past_key_values.*.", value.name))
        raise _Unmatched(f"{value.name} has no producer and is not a graph input")


# --- cutting pieces ---------------------------------------------------------------------------------------------


def _module_scope(model: nn.Module, module: nn.Module) -> str | None:
    """The TorchScript scope of ``module`` in a trace of a wrapper holding ``model`` as ``.model``, e.g.
    ``/model/model/embed_tokens/`` (None if it is not a submodule)."""
    path = next((name for name, candidate in model.named_modules() if candidate is module), None)
    return None if not path else "/model/" + path.replace(".", "/") + "/"


def _scope_output(nodes: list, scope: str):
    """The one value the nodes of ``scope`` compute from the graph's values for the rest of the graph (a constant
    defined in the scope and read outside does not count), or None if not exactly one."""
    inside = {node for node in nodes
              if (node.name or "").startswith(scope) and any(v is not None for v in node.inputs)}
    outputs = {id(v): v for node in inside for v in node.outputs
               if v.is_graph_output() or any(user not in inside for user, _ in v.uses())}
    return next(iter(outputs.values())) if len(outputs) == 1 else None


def _layer_scope(model: nn.Module, layers: nn.ModuleList, index: int) -> str:
    """The TorchScript scope of decoder layer ``index`` in a trace of a wrapper holding ``model`` as ``.model``:
    ``/model/model/layers.3/``."""
    path = next(name for name, module in model.named_modules() if module is layers)
    return "/model/" + path.replace(".", "/") + f".{index}/"


def _close_over_exclusive_producers(nodes: list, members: set) -> None:
    """Add to ``members`` every node that is unscoped (a folded constant, a pass's new node) or has no inputs (a
    ``Constant``) and whose outputs only ``members`` read, until nothing changes."""
    changed = True
    while changed:
        changed = False
        for node in reversed(nodes):
            if node in members or ((node.name or "").startswith("/") and any(v is not None for v in node.inputs)):
                continue
            users = [user for output in node.outputs for user, _ in output.uses()]
            if users and not any(output.is_graph_output() for output in node.outputs) and all(
                    user in members for user in users):
                members.add(node)
                changed = True


def _downstream(nodes: list, sources: set) -> set:
    """Nodes reading, directly or not, an output of ``sources`` (not ``sources`` themselves)."""
    reached: set = set()
    frontier = set(sources)
    for node in nodes:  # topological order
        if node in frontier:
            continue
        if any(value is not None and value.producer() in frontier for value in node.inputs):
            frontier.add(node)
            reached.add(node)
    return reached


@dataclasses.dataclass
class _Cut:
    layer: list
    epilogue: list
    prologue: list


_ROOT_SCOPE = re.compile(r"^/[^/]+$")


def _cut_piece(graph, scope: str, with_epilogue: bool) -> _Cut:
    """Split a piece's nodes into its layer's, the epilogue's (downstream of the layer) and the prologue's."""
    nodes = list(graph)
    # The wrapper's own nodes (scope "/" only) pack and unpack this layer's cache (DeepSeek-V2's MLA).
    scoped = {node for node in nodes if (node.name or "").startswith(scope)}
    if not scoped:
        raise RuntimeError(f"no node of the piece is in the decoder layer's scope {scope!r}")
    layer = scoped | {node for node in nodes if _ROOT_SCOPE.match(node.name or "")}
    _close_over_exclusive_producers(nodes, layer)
    epilogue: set = set()
    if with_epilogue:
        # Downstream of the layer proper: the prologue may read the unpacked cache (its past length), not this.
        epilogue = _downstream(nodes, scoped) - layer
        _close_over_exclusive_producers(nodes, epilogue)
    return _Cut([n for n in nodes if n in layer], [n for n in nodes if n in epilogue],
                [n for n in nodes if n not in layer and n not in epilogue])


# --- the stitched graph -------------------------------------------------------------------------------------------


class _ExternalData:
    """``model.onnx.data`` written as the pieces come: each large initializer appended, densely, in order.

    A value points at the file as soon as its bytes are written; nothing reads them back before :meth:`close`
    (digests and content keys are taken while the tensors are still in memory).
    """

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self.file = open(folder / name, "wb")
        self.offset = 0

    def store(self, value) -> None:
        """Write ``value``'s tensor to the file and make the value read it from there."""
        import onnx_ir as ir

        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) and tensor.location == self.name:
            return
        if tensor.nbytes < EXTERNAL_THRESHOLD_BYTES:
            return
        data = tensor.tobytes()
        self.file.write(data)
        value.const_value = ir.ExternalTensor(self.name, self.offset, len(data), tensor.dtype, shape=tensor.shape,
                                              name=value.name, base_dir=str(self.folder))
        self.offset += len(data)

    def close(self) -> None:
        """Flush and close the file."""
        if not self.file.closed:
            self.file.close()


class _Stitcher:
    """Accumulates the stitched graph: graph inputs, prologue, decoder layers in order, epilogue."""

    def __init__(self, data: _ExternalData):
        self.data = data
        self.inputs: dict[str, object] = {}
        self.outputs: dict[str, object] = {}
        self.nodes: list = []
        self.initializers: dict[str, object] = {}
        self.prologue_values: dict[tuple, object] = {}
        self.hidden = None  # the last added layer's output
        self.opset_imports: dict[str, int] = {}
        self._piece_outputs: list = []
        self._moved: set = set()
        self._node_names: set = set()
        self._initializer_keys: dict[str, tuple] = {}
        self._value_names: set = set()
        self.embeds = None  # the first piece's token embeddings: what a middle piece's ``inputs_embeds`` stands for
        self._embeds_digests: tuple[bytes, bytes] | None = None

    def add_piece(self, graph, cut: _Cut, index: int, first: bool, embeddings_scope: str | None = None) -> None:
        """Move a piece's layer (and, for the first, its prologue; for one with an epilogue, that) in.

        In the first piece, the output of the nodes in ``embeddings_scope`` (the token embedding module's) becomes
        :attr:`embeds`: a later piece traced from ``inputs_embeds`` reads it there, and its prologue values computed
        from it match the first piece's.
        """
        self.opset_imports.update(graph.opset_imports)
        structure = _Structure({INPUTS_EMBEDS: self._embeds_digests} if self._embeds_digests else None)
        self._piece_outputs = list(graph.outputs)
        self._moved = set()
        self._piece, self._piece_prologue, self._index = graph, set(cut.prologue), index
        graph.outputs.clear()
        # Every prologue value's digest now, while each initializer it reads is still in memory (an adopted one
        # is queued for the data file and not read back).
        prologue_keys = {id(v): structure.key(v) for node in cut.prologue for v in node.outputs}
        prologue_keys.update({id(v): structure.key(v) for v in graph.inputs})
        if first:
            for value in graph.inputs:
                if value.name != HIDDEN_IN:
                    self.inputs[value.name] = value
            for node in cut.prologue:
                for output in node.outputs:
                    self.prologue_values.setdefault(prologue_keys[id(output)], output)
            for value in graph.inputs:
                self.prologue_values.setdefault(prologue_keys[id(value)], value)
            embeds = _scope_output(list(graph), embeddings_scope) if embeddings_scope else None
            if embeds is not None:
                self.embeds, self._embeds_digests = embeds, structure.pair(embeds)
            self._move(graph, cut.prologue, structure, index, first=True)
        self._move(graph, cut.layer, structure, index, first)
        if cut.epilogue:
            self._move(graph, cut.epilogue, structure, index, first)
        # What stays behind must not be reachable from the stitched graph: a graph input it read (``past.{i}``)
        # would keep its nodes, their initializers and so the whole piece's protobuf alive.
        for node in list(graph):
            for position in range(len(node.inputs)):
                node.replace_input_with(position, None)
        graph.inputs.clear()

    def _move(self, graph, nodes: list, structure: _Structure, index: int, first: bool) -> None:
        members = set(nodes)
        self._moved |= members
        for node in nodes:
            for position, value in enumerate(node.inputs):
                if value is None:
                    continue
                producer = value.producer()
                if producer is not None and producer in self._moved:  # this piece's, already in place
                    continue
                replacement = self._resolve(value, structure, first)
                if replacement is not value:
                    node.replace_input_with(position, replacement)
        for output_value in self._piece_outputs:
            producer = output_value.producer()
            if producer is None or producer not in members:
                continue
            if output_value.name == HIDDEN_OUT:
                output_value.name = f"{producer.name}_output_{output_value.index()}"
                self.hidden = output_value
            else:
                self.outputs[output_value.name] = output_value
        graph.remove(nodes)
        for node in nodes:
            _own_tensors(node)
            node.name = self._unique(node.name or node.op_type, self._node_names)
            for output in node.outputs:
                if output.name is not None and not output.is_graph_output():
                    output.name = self._unique(output.name, self._value_names)
        self.nodes.extend(nodes)

    @staticmethod
    def _unique(name: str, taken: set) -> str:
        """``name``, or ``name.1``, ``name.2``, ... when another piece's unscoped counter already gave it."""
        candidate, k = name, 0
        while candidate in taken:
            k += 1
            candidate = f"{name}.{k}"
        taken.add(candidate)
        return candidate

    def _resolve(self, value, structure: _Structure, first: bool):
        """The stitched graph's counterpart of a value a moved node reads from outside its own part."""
        if self.initializers.get(value.name) is value:  # adopted for an earlier reader
            return value
        if value.is_initializer():
            return self._adopt_initializer(value)
        if value.is_graph_input():
            if value.name == HIDDEN_IN:
                if self.hidden is None:
                    raise RuntimeError("a piece reads the previous layer's output before any layer was stitched")
                return self.hidden
            if value.name == INPUTS_EMBEDS:
                if self.embeds is None:
                    raise RuntimeError("a piece reads the token embeddings before the first piece gave them")
                return self.embeds
            if value.name in self.inputs:
                return self.inputs[value.name]
            self.inputs[value.name] = value  # this layer's past_key_values.{i}
            return value
        if first:
            return value
        try:
            match = self.prologue_values.get(structure.key(value))
        except _Unmatched as exc:
            raise RuntimeError(f"the stitched export cannot place {value.name}: {exc}") from exc
        if match is not None:
            return match
        producer = value.producer()
        if producer is None or producer not in self._piece_prologue:
            raise RuntimeError(f"the stitched export cannot place {value.name}: it is computed neither by the "
                               "first piece's prologue nor by this piece's")
        # A prologue value the first piece does not compute (one only the epilogue reads: the first piece has
        # none): this piece's node comes in, its inputs resolved as any other's, and later readers share it.
        logger.debug("stitching %s from piece %d's prologue", producer.name, self._index)
        self._move(self._piece, [producer], structure, self._index, first=False)
        for output in producer.outputs:
            self.prologue_values.setdefault(structure.key(output), output)
        return value

    def _adopt_initializer(self, value):
        import onnx_ir as ir

        graph = value.graph
        name = value.name
        existing = self.initializers.get(name)
        key = _initializer_key(value)
        if existing is not None:
            if existing is value or self._initializer_keys[name] == key:
                return existing
            suffix = 1
            while f"{name}.{suffix}" in self.initializers:
                suffix += 1
            name = f"{name}.{suffix}"
        graph.initializers.pop(value.name)
        value.name = name
        if value.const_value is not None and value.const_value.name != name:
            value.const_value.name = name
        self._initializer_keys[name] = key
        self.data.store(value)
        if not isinstance(value.const_value, ir.ExternalTensor):  # small: kept in memory, on its own
            value.const_value = _own_tensor(value.const_value, name)
        self.initializers[name] = value
        return value

    def model(self, names: list[str], outputs: list[str], opset: int, producer_version: str):
        """The stitched :class:`onnx_ir.Model` with inputs and outputs in the contract's order."""
        import onnx_ir as ir
        import onnx_ir.passes.common as common_passes

        from mone_export.onnx_utils import finalize_model

        missing = [n for n in [*names, *outputs] if n not in self.inputs and n not in self.outputs]
        if missing:
            raise RuntimeError(f"the stitched export lacks {missing[:4]}")
        graph = ir.Graph([self.inputs[n] for n in names], [self.outputs[n] for n in outputs], nodes=self.nodes,
                         initializers=list(self.initializers.values()), opset_imports=dict(self.opset_imports),
                         name="main_graph")
        graph.sort()  # a prologue value may read a layer's (the MLA cache's unpacked past length)
        model = ir.Model(graph, ir_version=10)
        # Prologue nodes only the first piece's epilogue read, and the pieces' copies of equal small constants.
        # Neither pass reads a weight (the deduplication compares initializers up to 1024 elements).
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.DeduplicateInitializersPass(size_limit=1024)(model)
        return finalize_model(model, opset=opset, producer_version=producer_version)


def _own_tensor(tensor, name: str):
    """A copy of a small tensor that does not refer to the piece's protobuf: a tensor read from a protobuf keeps the
    whole message (every weight of the piece) alive, which grew the memory by a layer per layer."""
    import onnx_ir as ir

    return ir.tensor(np.array(tensor.numpy(), copy=True), dtype=tensor.dtype, name=name)


def _own_tensors(node) -> None:
    """:func:`_own_tensor` for what a moved node holds: its tensor attributes (``Constant`` values) and the
    constant values the optimizer recorded on its outputs."""
    import onnx_ir as ir

    for key, attr in list(node.attributes.items()):
        if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
            node.attributes[key] = ir.AttrTensor(key, _own_tensor(attr.value, attr.value.name or ""))
    for output in node.outputs:
        if output.const_value is not None and not isinstance(output.const_value, ir.ExternalTensor):
            output.const_value = _own_tensor(output.const_value, output.const_value.name or "")


# --- the export -----------------------------------------------------------------------------------------------


def export_onnx_streamed(streamed, output: str | os.PathLike, plan=None, *, opset: int | None = None,
                         progress: bool = True, moe_form: str = "dispatch") -> Path:
    """Export a layer-streamed model, pruned as ``plan`` says (or unpruned), and return the ``.onnx`` path.

    Args:
        streamed: a :class:`~mone_export.streaming.LayerStreamedModel` loaded in the export dtype (``fp32``,
            ``fp16`` or ``bf16``: the dtype of the graph).
        output: a ``.onnx`` file path, or a folder that receives ``model.onnx``; ``model.onnx.data`` beside it
            holds every weight (the streamed export always writes external data).
        plan: a :class:`~mone_export.plan.PruningPlan` for this model, or None for the unpruned export.
        opset: default-domain opset (default :data:`mone_export.export.DEFAULT_OPSET`).
        progress: a bar per decoder layer on a terminal, log lines otherwise.
        moe_form: the graph form of the routed experts, as :func:`mone_export.export.export_onnx`'s.

    The graph computes what :func:`mone_export.export.export_onnx` of the same model, pruned in memory, computes,
    with the same inputs, outputs and initializer names; only one decoder layer's weights are in memory at a time.
    """
    import onnx
    import onnx_ir as ir

    from mone_export import __version__
    from mone_export.architectures import check_exportable
    from mone_export.export import (DEFAULT_OPSET, MODEL_FILE, eval_mode, input_names, output_names,
                                    process_traced_graph)
    from mone_export.onnx_utils import DATA_SUFFIX
    from mone_export.progress import progress_bar
    from mone_export.streaming import return_freed_memory

    opset = DEFAULT_OPSET if opset is None else opset
    if opset < 16:
        raise UsageError(f"opset {opset} is too old: ScatterND with reduction='add' needs opset 16 or newer.")
    model, adapter = streamed.model, streamed.adapter
    check_exportable(model.config)
    if plan is not None:
        plan.validate_for(model, check_weights=False)
    output = Path(output)
    path = output if output.suffix == ".onnx" else output / MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = streamed.decoder_layers
    num_layers = len(layers)
    moe_by_index = {layer.index: layer for layer in streamed.moe_layers}
    log = logger.info if progress else logger.debug
    started = time.perf_counter()
    data_name = path.name + DATA_SUFFIX
    for stale in (path, path.with_name(data_name)):
        stale.unlink(missing_ok=True)
    data = _ExternalData(path.parent, data_name)
    stitcher = _Stitcher(data)
    embeddings_scope = _module_scope(model, model.get_input_embeddings())
    try:
        with eval_mode(model), tempfile.TemporaryDirectory(prefix=".mone-export-", dir=path.parent) as tmp:
            for index in progress_bar(range(num_layers), desc="exporting (by layer)", unit="layer", enabled=progress):
                with streamed.loaded_layer(index, plan):
                    routing = []
                    if index in moe_by_index:
                        routing = [f"{adapter.block_path(index)}.routing_weights"]
                    raw = Path(tmp) / f"piece{index}"
                    # A middle piece is traced from the token embeddings the first piece computes: it does not
                    # serialise the embedding table again (a third of a piece's bytes on the 640M Qwen3-MoE).
                    embeds_in = 0 < index < num_layers - 1 and stitcher.embeds is not None
                    piece = _traced_piece(model, layers, index, raw, opset, moe_form, embeds_in)
                    with only_layer(layers, index):
                        piece = process_traced_graph(piece, model, routing, streamed.dtype)
                scope = _layer_scope(model, layers, index)
                last = index == num_layers - 1
                cut = _cut_piece(piece.graph, scope, with_epilogue=last)
                stitcher.add_piece(piece.graph, cut, index, first=index == 0, embeddings_scope=embeddings_scope)
                del piece, cut
                # A piece is a web of reference cycles (graph, nodes, values): collect it now, not whenever the
                # collector next runs (measured: the RSS grew by a layer per layer until it did).
                gc.collect()
                return_freed_memory()
                _remove_tree(raw)
                log("layer %d/%d exported (%.1f s)", index + 1, num_layers, time.perf_counter() - started)
        data.close()
        stitched = stitcher.model(input_names(num_layers), output_names(num_layers), opset, __version__)
        onnx.save(ir.serde.serialize_model(stitched), str(path))
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            data.close()
        for partial in (path, path.with_name(data_name)):
            partial.unlink(missing_ok=True)
        raise
    log("wrote %s (%.1f MB of weights) in %.1f s", path, data.offset / 1e6, time.perf_counter() - started)
    return path


PIECE_BUFFER_LIMIT_BYTES = 1 << 30
"""A piece whose loaded weights are under this many bytes is traced into memory, a larger one into a file."""


def _traced_piece(model: nn.Module, layers: nn.ModuleList, index: int, folder: Path, opset: int,
                  moe_form: str = "dispatch", embeds_in: bool = False):
    """Piece ``index`` traced and read back as an ``onnx_ir`` model.

    Into an in-memory buffer parsed in place, so its bytes are never written and read back (measured on the
    640M-parameter Qwen3-MoE: 33.5 s against 39 s for the whole export, peak 3612 against 3554 MB). A piece of
    :data:`PIECE_BUFFER_LIMIT_BYTES` or more goes through a file in ``folder`` instead: the exporter writes a model
    over protobuf's 2 GiB limit only to a file, with external data.
    """
    import onnx
    import onnx_ir as ir

    if _loaded_bytes(model) < PIECE_BUFFER_LIMIT_BYTES:
        buffer = io.BytesIO()
        _trace_piece(model, layers, index, buffer, opset, moe_form, embeds_in)
        proto = onnx.ModelProto()
        with buffer.getbuffer() as view:
            proto.ParseFromString(view)
        buffer.close()
        return ir.serde.deserialize_model(proto)
    path = folder / "piece.onnx"
    folder.mkdir()
    _trace_piece(model, layers, index, path, opset, moe_form, embeds_in)
    return ir.load(path)


def _loaded_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors in memory (a layer-streamed model's unloaded layers are on ``meta``)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if not t.is_meta)


def _remove_tree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)

"""A residual add and the RMS norm after it -> ``com.microsoft.SkipSimplifiedLayerNormalization``.

transformers' ``RMSNorm`` traces to about eight standard ops::

    xc = Cast(x, to=float)                      # optional (the norm computes in float32)
    r  = Div(1, Sqrt(Add(ReduceMean(Pow(xc, 2), axes=[-1]), eps)))    # or Reciprocal(Sqrt(...))
    y  = Mul(scale, Cast(Mul(xc, r), to=T))     # the Cast optional, Mul operands in either order

and a decoder layer adds its residual just before the next norm: ``s = Add(a, b); y = RMSNorm(s)``.
:class:`FuseNormsPass` rewrites that pair, with the onnxscript rewrite rule :class:`SkipRmsNorm`, into
``com.microsoft.SkipSimplifiedLayerNormalization(a, b, scale)``, whose fourth output is the sum (the residual stream
of the next layer). The sum may reach the norm through a ``Cast`` (``x.to(float32)``): one that keeps the type is
dropped, one that widens float16 to float32 is what the kernel does inside.

A norm with no add before it (the first layer's, a query/key norm) stays as it is: ONNX Runtime fuses it into
``SimplifiedLayerNormalization`` when it loads the graph, and writing that op here would put a name that is not an
ONNX operator into the default domain, which ``onnx.checker`` rejects. ONNX Runtime does not fuse the residual add
itself on a graph without shape information (an exported decoder's residual ``Add`` has none).

Exact up to floating-point rounding: the kernel computes what the ops compute, in float32. It needs its two summands
of one shape (it broadcasts neither), which holds for the residual stream of a decoder; the rule refuses summands
whose known shapes differ.
"""

from __future__ import annotations

__all__ = ["FuseNormsPass", "SkipRmsNorm", "fusion_rules"]

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.pattern import MatchResult, OrValue, RewriteRuleClassBase, RewriteRuleSet

from graph_passes._graph_utils import Liveness, const_array

logger = logging.getLogger(__name__)

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


def _fail(reason: str, *sources: ir.Node | ir.Value | None) -> MatchResult:
    return MatchResult().fail(reason, [s for s in sources if s is not None] or None)


def _scalar(value: ir.Value | None) -> float | None:
    array = const_array(value)
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return float(array.reshape(()))


def _reduced_axes(mean: ir.Value) -> list[int] | None:
    """The axes of the ReduceMean producing ``mean`` (input since opset 18, attribute before), or None."""
    node = mean.producer()
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = const_array(node.inputs[1])
        return None if array is None else [int(a) for a in np.ravel(array)]
    axes = node.attributes.get_ints("axes", None)
    return None if axes is None else list(axes)


def _one_dim_scale(scale: ir.Value) -> MatchResult:
    """The norm's scale is a 1-D float vector (the kernels' gamma ``[D]``)."""
    if scale.dtype is not None and scale.dtype not in _FLOAT_TYPES:
        return _fail(f"the scale is {scale.dtype}, not a float type", scale)
    shape = scale.shape
    if shape is None:
        array = const_array(scale)
        shape = None if array is None else array.shape
    if shape is None or len(shape) != 1:
        return _fail(f"the scale has shape {shape}, not [D]", scale)
    return MatchResult()


def _rms_norm(op, xc, scale, two, epsilon, one, target_type, *, reciprocal: bool, scale_first: bool):
    """transformers' RMSNorm of ``xc`` (already in its compute type) as traced; the variable names of the checks."""
    mean = op.ReduceMean(op.Pow(xc, two), _allow_other_inputs=True, _outputs=["mean"])
    rms = op.Sqrt(op.Add(mean, epsilon))
    inverse = op.Reciprocal(rms) if reciprocal else op.Div(one, rms)
    normalized = OrValue([op.Cast(op.Mul(xc, inverse), to=target_type), op.Mul(xc, inverse)])
    return op.Mul(scale, normalized) if scale_first else op.Mul(normalized, scale)


def _check_rms_norm(two, epsilon, one, mean, scale, *, reciprocal: bool) -> MatchResult:
    if _scalar(two) != 2.0:
        return _fail("the Pow exponent is not the constant 2", two)
    if not reciprocal and _scalar(one) != 1.0:
        return _fail("the Div numerator is not the constant 1 (not an inverse root)", one)
    if _scalar(epsilon) is None:
        return _fail("epsilon is not a float scalar constant", epsilon)
    producer = mean.producer()
    if producer.attributes.get_int("keepdims", 1) != 1:
        return _fail("ReduceMean has keepdims=0", producer)
    if _reduced_axes(mean) != [-1]:
        return _fail(f"ReduceMean reduces axes {_reduced_axes(mean)}, not [-1] (not a norm over the last axis)",
                     producer)
    return _one_dim_scale(scale)


@dataclasses.dataclass(frozen=True)
class _Fused:
    """One fusion, for the pass to finish: the readers of the old sum (and of a no-op Cast of it) move to ``sum``."""

    total: ir.Value
    stream: ir.Value | None  # the Cast's output where the pattern has one and it keeps the type
    sum: ir.Value


class SkipRmsNorm(RewriteRuleClassBase):
    """``Add(a, b)``, optionally a ``Cast``, then an RMS norm -> ``SkipSimplifiedLayerNormalization(a, b, scale)``.

    Variants: with or without the ``Cast`` (to the summands' own type, or float16 -> float32), ``Div(1, rms)`` or
    ``Reciprocal(rms)``, the scale left or right of the last ``Mul``; both ``Add`` orders come from ``commute``.

    The pattern has one output, the norm's (onnxscript matches a pattern with several outputs by trying node
    combinations, far too slow on a decoder graph), and keeps its nodes (``remove_nodes=False``): the sum feeds the
    next layer too. The rewrite records each fusion in ``record``; :class:`FuseNormsPass` then moves the sum's other
    readers onto the kernel's fourth output and removes what became dead.
    """

    def __init__(self, *, cast: bool, reciprocal: bool, scale_first: bool, record: list | None = None) -> None:
        super().__init__(f"SkipRmsNorm(cast={cast}, reciprocal={reciprocal}, scale_first={scale_first})",
                         remove_nodes=False)
        self._cast = cast
        self._reciprocal = reciprocal
        self._scale_first = scale_first
        self._record = [] if record is None else record

    def pattern(self, op, a, b, scale, two, epsilon, one, to, target_type):
        total = op.Add(a, b, _outputs=["total"])
        stream = op.Cast(total, to=to, _outputs=["stream"]) if self._cast else total
        return _rms_norm(op, stream, scale, two, epsilon, one, target_type, reciprocal=self._reciprocal,
                         scale_first=self._scale_first)

    def check(self, context, a, b, scale, two, epsilon, one, mean, to=None, **_) -> MatchResult:
        result = _check_rms_norm(two, epsilon, one, mean, scale, reciprocal=self._reciprocal)
        if not result:
            return result
        known = {v.dtype for v in (a, b) if v.dtype is not None}
        if not known:
            return _fail("neither summand has a known element type", a, b)
        if len(known) > 1:
            return _fail(f"the summands have different element types {sorted(t.name for t in known)}", a, b)
        (dtype,) = known
        if dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            return _fail(f"the summands are {dtype.name}: the kernel computes float32 from float32 or float16", a)
        if self._cast:
            cast_to = ir.DataType(to.as_int())
            if cast_to != dtype and not (dtype == ir.DataType.FLOAT16 and cast_to == ir.DataType.FLOAT):
                return _fail(f"the Cast changes {dtype.name} into {cast_to.name}, which the kernel does not compute",
                             a)
        elif dtype != ir.DataType.FLOAT:
            return _fail(f"the norm computes in {dtype.name}, not float32 as the kernel does", a)
        if scale.dtype is not None and scale.dtype != dtype:
            return _fail(f"the scale is {scale.dtype.name}, the summands {dtype.name} (the kernel takes one type)",
                         scale)
        if a.shape is not None and b.shape is not None and a.shape != b.shape:
            return _fail(f"the summands' shapes differ ({a.shape} vs {b.shape}): the kernel does not broadcast", a)
        return MatchResult()

    def rewrite(self, op, a, b, scale, epsilon, total, stream=None, to=None, **_):
        output, _mean, _inverse, sum_ = op.SkipSimplifiedLayerNormalization(
            a, b, scale, epsilon=_scalar(epsilon), _domain="com.microsoft", _outputs=4)
        # A Cast that keeps the type goes; readers of a widening one keep it (it then reads the kernel's sum).
        keeps_type = self._cast and ir.DataType(to.as_int()) in {v.dtype for v in (a, b)}
        self._record.append(_Fused(total=total, stream=stream if keeps_type else None, sum=sum_))
        return output


def fusion_rules(record: list | None = None) -> RewriteRuleSet:
    """The rule in all its variants (the ``Cast`` tried first), recording into ``record``."""
    return RewriteRuleSet([SkipRmsNorm.rule(cast=c, reciprocal=r, scale_first=s, record=record)
                           for c in (True, False) for r in (False, True) for s in (True, False)], commute=True)


class FuseNormsPass(ir.passes.InPlacePass):
    """Residual ``Add`` + RMS norm -> ``com.microsoft.SkipSimplifiedLayerNormalization``; nothing else changes
    (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        liveness = Liveness(graph)
        record: list[_Fused] = []
        count = fusion_rules(record).apply_to_model(model)
        if not count:
            return ir.passes.PassResult(model, modified=False)
        for fused in record:
            ir.convenience.replace_all_uses_with(fused.total, fused.sum)
            if fused.stream is not None:
                ir.convenience.replace_all_uses_with(fused.stream, fused.sum)
        liveness.remove_newly_dead(graph)
        graph.sort()  # a reader of the sum may have stood before the norm the kernel replaced
        logger.debug("FuseNormsPass: %d residual adds and RMS norms fused", count)
        return ir.passes.PassResult(model, modified=True)

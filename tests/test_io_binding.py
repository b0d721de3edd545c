"""IO binding (mone_export/io_binding.py) on the CPU provider: the code path the CUDA provider runs.

A decode loop whose cache stays in OrtValues must compute exactly what the numpy loop computes (same session, same
inputs), at batch 1 and batch 3, for both MoE graph forms.
"""

from __future__ import annotations

import numpy as np
import pytest

from mone_export.export import export_onnx
from mone_export.io_binding import BoundDecoder, bound_runner
from mone_export.validate import OrtDecoder, ort_runner
from test_export import build_model

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["dispatch", "fused"])
def decoder(request, tmp_path_factory):
    model, _ = build_model("qwen3_moe", "mone")
    path = export_onnx(model, tmp_path_factory.mktemp(request.param), moe_form=request.param, progress=False)
    return OrtDecoder(path, "cpu", threads=1)


@pytest.mark.parametrize("batch", [1, 3])
def test_bound_greedy_loop_equals_numpy_loop(decoder, batch):
    rng = np.random.default_rng(batch)
    ids = rng.integers(0, 97, (batch, 6))
    mask, positions = np.ones((batch, 6), np.int64), np.tile(np.arange(6), (batch, 1))
    bound = BoundDecoder(decoder)
    logits, past = decoder(ids, mask, positions, decoder.empty_past(batch))
    value, past_values = bound.step(ids, mask, positions, bound.empty_past(batch))
    assert all(type(v).__name__ == "OrtValue" for v in past_values)
    np.testing.assert_array_equal(bound.logits(value), logits)
    for step in range(4):
        nxt = logits[:, -1].argmax(-1).reshape(batch, 1)
        mask = np.ones((batch, 7 + step), np.int64)
        positions = np.full((batch, 1), 6 + step)
        logits, past = decoder(nxt, mask, positions, past)
        value, past_values = bound.step(nxt, mask, positions, past_values)
        np.testing.assert_array_equal(bound.logits(value), logits)
    np.testing.assert_array_equal(past_values[-1].numpy(), past[-1])


def test_bound_runner_computes_what_the_numpy_runner_computes(decoder):
    ids = np.random.default_rng(0).integers(0, 97, (2, 9))
    plain, bound = ort_runner(decoder, ids[:1]), ort_runner(decoder, ids[:1], io_binding=True)
    np.testing.assert_array_equal(BoundDecoder.logits(bound.prefill()[0]), plain.prefill()[0])
    np.testing.assert_array_equal(BoundDecoder.logits(bound.decode()[0]), plain.decode()[0])
    batched = bound_runner(decoder, ids)
    logits, present = batched.decode()
    assert BoundDecoder.logits(logits).shape == (2, 1, 97) and present[0].shape()[2] == 10

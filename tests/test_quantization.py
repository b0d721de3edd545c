"""int4 / int8 exports (``--quant``): what is quantised, exact parity with the dequantised PyTorch model, the
validation gate, the CLI (issue 13).

The quantised graph is checked three ways: with ``accuracy_level=0`` (float activations) ONNX Runtime must compute
what the PyTorch model with the same dequantised weights computes, to 1e-4 like any fp32 export; the weight bytes
must be exactly those of the blocks; and the default fast export must pass validation against float32 PyTorch by
the yardstick of the dequantised model, while an export with scrambled nibbles must fail it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from graph_passes.quantize_weights import DEFAULT_BLOCK_SIZE, METADATA_KEY
from mone_export import load_model
from mone_export.export import exported_weight_names, export_onnx, weight_bytes
from mone_export.export_pipeline import export_model
from mone_export.novices import apply_plan
from mone_export.ort_session import OrtDecoder
from mone_export.pipeline import CalibrationOptions
from mone_export.plan import PruningPlan
from mone_export.quantization import (dequantized_model, full_precision_parameters, quantization_config,
                                      read_quantization)
from mone_export.validate import check_logits, validate_export

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIB = CalibrationOptions(samples=8, seq_len=64)
FAST = {"latency": False, "memory": False}


def _pruned(name: str, ratio: float = 0.5):
    """A bundled model pruned with MoNE on a small calibration."""
    from mone_export.pipeline import calibrate_and_plan

    model, tokenizer = load_model(name, dtype="fp32")
    plan, _ = calibrate_and_plan(model, tokenizer, ratio, "mone", "layer", CALIB, False)
    apply_plan(model, plan)
    return model


@pytest.fixture(scope="module")
def pruned_qwen():
    return _pruned("qwen2_moe")


@pytest.mark.parametrize("bits", [4, 8])
def test_exact_kernels_match_the_dequantized_model(pruned_qwen, tmp_path, bits):
    config = quantization_config(f"int{bits}", block_size=32, accuracy_level=0)
    path = export_onnx(pruned_qwen, tmp_path, progress=False, quantization=config)
    record = read_quantization(path)
    reference = dequantized_model(pruned_qwen, record)
    prompts = torch.randint(0, pruned_qwen.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    rows, failures = check_logits(OrtDecoder(path), reference, prompts, 3, 1e-4, "float32")

    assert not failures, rows
    # ... and the quantisation is real: float32 PyTorch is far away
    _, far = check_logits(OrtDecoder(path), pruned_qwen, prompts, 0, 1e-3, "float32")
    assert far


def _scalar_constant_bytes(path) -> int:
    """Bytes of the float scalars in ``Constant`` nodes (epsilons, exponents: what a decomposed norm holds)."""
    proto = onnx.load(str(path), load_external_data=False)
    tensors = [a.t for node in proto.graph.node if node.op_type == "Constant" for a in node.attribute
               if a.name == "value"]
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in tensors
               if t.data_type == onnx.TensorProto.FLOAT and not any(d != 1 for d in t.dims))


def test_what_is_quantised(pruned_qwen, tmp_path):
    fp32 = export_onnx(pruned_qwen, tmp_path / "fp32", progress=False)
    config = quantization_config("int4")
    int4 = export_onnx(pruned_qwen, tmp_path / "int4", progress=False, quantization=config)
    record = read_quantization(int4)
    graph = ir.load(int4).graph
    ops = [node.op_type for node in graph]

    # every quantised initializer is a weight of the model, and no router or gate is among them
    names = exported_weight_names(pruned_qwen)
    kept = full_precision_parameters(pruned_qwen)
    assert kept >= {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight"}
    assert all(names[name].parameter not in kept for name in record["weights"])
    assert record["weights"]["model.embed_tokens.weight"] == 1 and ops.count("GatherBlockQuantized") == 1
    # float32 matrices left: the routers, the shared-expert gates and the novice bias tables
    floats = sorted(name for name, value in graph.initializers.items()
                    if value.const_value.dtype == ir.DataType.FLOAT and len(value.shape) == 2
                    and not name.endswith(".scales"))
    layers = pruned_qwen.config.num_hidden_layers
    assert len(floats) == 3 * layers
    assert all(name.endswith((".gate.weight.T", ".shared_expert_gate.weight.T", ".novice_bias")) for name in floats)
    assert ops.count("MatMulNBits") == len(record["weights"]) - 1  # all but the embedding

    # the bytes are exactly those of the blocks: packed levels, float32 scales, packed zero points; besides, the
    # fused norms (graph_passes.fuse_norms) drop the decomposed norms' scalar constants
    fp32_graph = ir.load(fp32).graph
    expected = weight_bytes(fp32)
    dropped = _scalar_constant_bytes(fp32) - _scalar_constant_bytes(int4)
    assert dropped > 0
    expected -= dropped
    assert record["block_size"] == DEFAULT_BLOCK_SIZE == 128 and "block_sizes" not in record
    for name, axis in record["weights"].items():
        shape = fp32_graph.initializers[name].const_value.shape
        k, n = (shape[0], shape[1]) if axis == 0 else (shape[1], shape[0])
        blocks = -(-k // 128)
        expected += n * blocks * 64 + n * blocks * 4 + n * -(-blocks // 2) - 4 * k * n
    assert weight_bytes(int4) == expected
    assert weight_bytes(int4) < 0.25 * weight_bytes(fp32)
    onnx.checker.check_model(onnx.load(str(int4)), full_check=True)


def test_deterministic(pruned_qwen, tmp_path):
    config = quantization_config("int4")
    first = export_onnx(pruned_qwen, tmp_path / "a", progress=False, quantization=config)
    second = export_onnx(pruned_qwen, tmp_path / "b", progress=False, quantization=config)
    assert first.read_bytes() == second.read_bytes()


@pytest.fixture(scope="module")
def int4_mixtral(tmp_path_factory):
    out = tmp_path_factory.mktemp("int4") / "mixtral"
    report = export_model("mixtral", 0.5, out, calib=CALIB, quant="int4", validation_options=FAST, progress=False)
    return out, report


def test_pipeline_int4_passes_by_the_yardstick(int4_mixtral):
    out, report = int4_mixtral
    assert report["passed"] and report["quantization"]["bits"] == 4
    verdict = report["validation"]["quantization"]
    # the export's error against float32 is the weight format's own, within 1.5x + atol of it
    assert 0.05 < verdict["torch_int4_max_abs_diff"] and verdict["onnx_max_abs_diff"] <= verdict["bound"]
    assert verdict["bound"] == pytest.approx(1.5 * verdict["torch_int4_max_abs_diff"] + verdict["epsilon"])
    assert verdict["agreement"]["onnx"] >= verdict["agreement"]["torch_int4"]
    assert report["weights"]["pruned_bytes"] < 0.3 * report["weights"]["lower_bound_bytes"]
    markdown = (out / "report.md").read_text()
    assert "int4 weights (block 128)" in markdown and "PyTorch int4-weights" in markdown


def _swap_nibbles(folder, tmp_path):
    """The export with every quantised matrix's nibbles swapped: the layout bug that is silently wrong (a packing
    bug reaches every weight). Swapping one layer's experts only is not always caught: with blocks of 128 on the
    bundled mixtral it moved the error from 1.30 to 1.57 against a bound of 2.08 (docs/validation.md)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    model = onnx.load(str(broken / "model.onnx"))
    swapped = 0
    for tensor in model.graph.initializer:
        if tensor.name.endswith(".int4"):
            array = onnx.numpy_helper.to_array(tensor)
            tensor.CopyFrom(onnx.numpy_helper.from_array(((array & 15) << 4) | (array >> 4), tensor.name))
            swapped += 1
    assert swapped
    onnx.save(model, str(broken / "model.onnx"))
    return broken


def test_validation_fails_a_wrong_quantized_export(int4_mixtral, tmp_path):
    out, _ = int4_mixtral
    model, tokenizer = load_model("mixtral", dtype="fp32")
    apply_plan(model, PruningPlan.load(out / "plan", model=model))
    good = validate_export(out, model, tokenizer=tokenizer, **FAST)
    assert good["passed"], good["failures"]

    bad = validate_export(_swap_nibbles(out, tmp_path), model, tokenizer=tokenizer, **FAST)

    assert not bad["passed"]
    assert any("logits" in f["output"] or "routing" in f["output"] for f in bad["failures"])


def test_validate_command_reads_the_record(int4_mixtral):
    out, _ = int4_mixtral
    result = subprocess.run([sys.executable, "-m", "mone_export.cli", "validate", str(out), "--no-latency", "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["validation"]["quantization"]["weights"]["bits"] == 4


@pytest.mark.parametrize("arguments, message", [
    (["--quant", "int4", "--dtype", "fp16"], "--quant int4 needs --dtype fp32"),
    (["--quant", "int8", "--moe-form", "fused"], "--moe-form dispatch"),
    (["--quant", "int4", "--quant-block-size", "48"], "block_size must be a power of two"),
    (["--quant", "int3"], "invalid choice"),
])
def test_cli_usage_errors(tmp_path, arguments, message):
    result = subprocess.run([sys.executable, "-m", "mone_export.cli", "--model", "mixtral", "--ratio", "0.5",
                             "-o", str(tmp_path / "out"), *arguments], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()

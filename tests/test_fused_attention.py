"""``--attention gqa``: one com.microsoft.GroupQueryAttention per layer, exact against PyTorch (issue 13).

Each bundled family whose attention the kernel computes is exported fused and must match the pruned PyTorch model
like the plain form does (1e-4 on logits at the prefill of a batch and through decode steps, and for a chunked
prompt on top of a past); onnxruntime-genai must generate PyTorch's greedy tokens from the folder; models the
kernel cannot serve (DeepSeek-V2's latent cache) are refused with the reason, and ``auto`` falls back to plain.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

from mone_export import load_model
from mone_export.errors import UsageError
from mone_export.export import export_onnx, lower_bound_bytes, weight_bytes
from mone_export.onnx_utils import rotary_table_bytes
from mone_export.export_pipeline import ExportOptions, export_model
from mone_export.fused_attention import gqa_unsupported_reason, resolve_attention, rotary_cache
from mone_export.novices import apply_plan
from mone_export.ort_session import OrtDecoder
from mone_export.pipeline import CalibrationOptions, calibrate_and_plan
from mone_export.reference import torch_step
from mone_export.validate import check_logits
from tiny_models import tiny_model, tiny_model_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIB = CalibrationOptions(samples=8, seq_len=64)
FUSED = ["mixtral", "qwen2_moe", "olmoe"]


def _pruned(name: str):
    model, tokenizer = load_model(name, dtype="fp32")
    plan, _ = calibrate_and_plan(model, tokenizer, 0.5, "mone", "layer", CALIB, False)
    apply_plan(model, plan)
    return model


@pytest.mark.parametrize("name", FUSED)
def test_fused_export_matches_pytorch(name, tmp_path):
    model = _pruned(name)
    path = export_onnx(model, tmp_path, progress=False, attention="gqa")
    graph = ir.load(path).graph
    ops = collections.Counter(node.op_type for node in graph)
    layers = model.config.num_hidden_layers
    assert ops["GroupQueryAttention"] == layers
    # the rotary embedding is inside the kernel: no angle computed in the graph
    assert all(n.attributes.get_int("do_rotary", 0) == 1 for n in graph if n.op_type == "GroupQueryAttention")
    assert ops["Sin"] == ops["Cos"] == 0
    # the residual adds and the norms after them are fused: 2 per layer (the first layer's input norm has no add)
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    # the kernel's cos/sin tables are the only bytes beyond the parameters kept (docs/graph.md#weight-bytes)
    tables = rotary_table_bytes(path)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    assert tables == 2 * model.config.max_position_embeddings * head_dim // 2 * 4
    assert weight_bytes(path) <= 1.005 * (lower_bound_bytes(model) + tables)
    # no attention softmax or mask left: the only Softmax nodes are the routers'
    assert ops["Softmax"] <= layers and ops["Where"] == 0
    prompts = torch.randint(0, model.config.vocab_size, (3, 13), generator=torch.Generator().manual_seed(1))

    rows, failures = check_logits(OrtDecoder(path), model, prompts, 4, 1e-4, "float32")

    assert not failures, rows


@pytest.mark.parametrize("model_type, window", [("gpt_oss", 4), ("mixtral", 5)])
def test_sliding_windows_and_sinks(model_type, window, tmp_path):
    """gpt-oss (sliding and full layers alternating, attention sinks) and a Mixtral whose every layer slides: the
    kernel's local window and head sinks match transformers' eager attention on prompts longer than the window."""
    model = tiny_model_of(model_type, head_dim=16, sliding_window=window)
    sinks = [m.sinks for m in model.modules() if isinstance(getattr(m, "sinks", None), torch.nn.Parameter)]
    with torch.no_grad():
        for sink in sinks:  # sizeable sinks, so that a kernel ignoring them would fail the check
            sink.copy_(torch.randn(sink.shape, generator=torch.Generator().manual_seed(5)) * 2)
    assert gqa_unsupported_reason(model) is None
    path = export_onnx(model, tmp_path, progress=False, attention="gqa")
    nodes = [node for node in ir.load(path).graph if node.op_type == "GroupQueryAttention"]
    types = getattr(model.config, "layer_types", None) or ["sliding_attention"] * model.config.num_hidden_layers
    assert [n.attributes.get_int("local_window_size", -1) for n in nodes] == [
        window if kind == "sliding_attention" else -1 for kind in types]
    assert all((len(n.inputs) == 12 and n.inputs[11] is not None) == bool(sinks) for n in nodes)
    assert all(n.attributes.get_int("do_rotary", 0) == 1 for n in nodes)  # gpt-oss: YaRN, half-width angles
    prompts = torch.randint(0, model.config.vocab_size, (3, 13), generator=torch.Generator().manual_seed(1))

    rows, failures = check_logits(OrtDecoder(path), model, prompts, 4, 1e-4, "float32")

    assert not failures, rows


def test_a_rotary_the_kernel_cannot_take_stays_in_the_graph(tmp_path):
    """Dynamic NTK scaling changes the angles with the sequence length: one cache cannot hold them, so the model's
    own rotary ops stay and the kernel gets rotated queries and keys."""
    model = tiny_model_of("mixtral", head_dim=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                   "rope_theta": 10000.0})
    assert rotary_cache(model) is None
    path = export_onnx(model, tmp_path, progress=False, attention="gqa")
    graph = ir.load(path).graph
    assert [n.attributes.get_int("do_rotary", 0) for n in graph if n.op_type == "GroupQueryAttention"] == [0] * 3
    assert any(n.op_type == "Cos" for n in graph)
    prompts = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    rows, failures = check_logits(OrtDecoder(path), model, prompts, 3, 1e-4, "float32")
    assert not failures, rows


def test_chunked_prompt_on_a_past(tmp_path):
    """One prompt fed in two chunks (S > 1 with a past): the kernel's causal mask is offset by the past."""
    model = _pruned("mixtral")
    decoder = OrtDecoder(export_onnx(model, tmp_path, progress=False, attention="gqa"))
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 12))
    first, second = ids[:, :7], ids[:, 7:]
    _, past = decoder(first, np.ones_like(first), np.arange(7)[None], decoder.empty_past(1))
    logits, _ = decoder(second, np.ones((1, 12), np.int64), np.arange(7, 12)[None], past)
    want, _ = torch_step(model, ids, np.ones_like(ids), np.arange(12)[None], None)
    assert np.abs(logits - want[:, 7:].numpy()).max() <= 1e-4


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss"])
def test_left_padded_batch(name, tmp_path):
    """A left-padded batch (Optimum's and transformers' batched ``generate``: zeros at the start of the mask,
    positions counted from the mask) prefills and decodes like PyTorch. The padded keys are masked by the kernel's
    bias; the rotary inside the kernel rotates a row at its slots, a constant shift the scores do not see. gpt-oss
    adds a window of 4 (one row's padding is longer than it) and attention sinks."""
    if name == "gpt_oss":
        model = tiny_model_of("gpt_oss", head_dim=16, sliding_window=4)
    else:
        model = _pruned(name)
    decoder = OrtDecoder(export_onnx(model, tmp_path, progress=False, attention="gqa"))
    rng = np.random.default_rng(7)
    ids = rng.integers(0, model.config.vocab_size, (3, 9))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :6] = 0
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits, past = decoder(ids, mask, positions, decoder.empty_past(3))
    want, cache = torch_step(model, ids, mask, positions, None)
    assert np.abs(logits - want.numpy())[mask > 0].max() <= 1e-4
    assert np.isfinite(logits).all()  # the padded rows too: no NaN reaches the next layer's keys
    for _ in range(4):
        ids = logits[:, -1:].argmax(-1)
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        logits, past = decoder(ids, mask, positions, past)
        want, cache = torch_step(model, ids, mask, positions, cache)
        assert np.abs(logits - want.numpy()).max() <= 1e-4


def test_auto_is_the_default_and_keeps_plain_attention_for_cuda():
    """``auto`` (the command line's and ``ExportOptions``' default) fuses a model the kernel computes, except for
    ``--provider cuda`` (the kernel's CUDA version is fp16/bf16 only and unmeasured here): plain there."""
    model = tiny_model_of("mixtral", head_dim=16)
    assert ExportOptions().attention == "auto"
    assert resolve_attention("auto", model) == "gqa"
    assert resolve_attention("auto", model, "cuda") == "plain"
    assert resolve_attention("gqa", model, "cuda") == "gqa"


def test_latent_attention_is_refused_and_auto_falls_back(tmp_path):
    model, _ = load_model("deepseek_v2", dtype="fp32")
    assert "MLA" in gqa_unsupported_reason(model)
    with pytest.raises(UsageError, match="cannot use GroupQueryAttention"):
        export_onnx(model, tmp_path / "gqa", progress=False, attention="gqa")
    path = export_onnx(model, tmp_path / "auto", progress=False, attention="auto")
    assert not any(node.op_type == "GroupQueryAttention" for node in ir.load(path).graph)


def test_head_size_the_kernel_refuses(tmp_path):
    model = tiny_model("qwen3_moe")
    assert model.config.head_dim % 8  # the tiny configs' awkward sizes
    assert "multiple of 8" in gqa_unsupported_reason(model)
    with pytest.raises(UsageError, match="multiple of 8"):
        export_onnx(model, tmp_path, progress=False, attention="gqa")


def test_pipeline_and_genai(tmp_path):
    out = tmp_path / "out"
    report = export_model("qwen2_moe", 0.5, out, calib=CALIB, attention="gqa", progress=False,
                          validation_options={"latency": False, "memory": False})
    assert report["passed"] and report["attention"] == "gqa"
    # genai hands the kernel one buffer as past and present (written in place): the tokens below go through it
    assert json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    og = pytest.importorskip("onnxruntime_genai")
    from mone_export.reference import greedy_torch

    model, _ = load_model("qwen2_moe", dtype="fp32")
    from mone_export.plan import PruningPlan

    apply_plan(model, PruningPlan.load(out / "plan", model=model))
    genai = og.Model(str(out))
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, model.config.vocab_size, 9)]
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(prompt) + 16, do_sample=False)
    generator = og.Generator(genai, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    tokens = [int(t) for t in generator.get_sequence(0)[len(prompt):]]
    want, _ = greedy_torch(model, torch.tensor(prompt), 16, set())
    assert tokens == list(want)[: len(tokens)] and len(tokens) == 16


# --- families the kernel does or does not express, measured (fused_attention.gqa_mismatch) --------------------------


@pytest.mark.parametrize("model_type, expected", [("phimoe", "plain"), ("llama4_text", "plain"),
                                                  ("beam", "gqa"), ("gemma4_text", "gqa")])
def test_auto_takes_the_fused_attention_only_where_it_computes_the_model(model_type, expected, tmp_path, capsys):
    """PhiMoE applies its window through the mask alone and Llama 4 chunks its attention and norms after the rotary:
    the probe measures the difference, ``auto`` keeps plain attention and ``gqa`` is refused with the number. Beam
    and Gemma 4 (a rotary type per layer type: rotary left in the graph) fuse and pass their validation."""
    import json

    from mone_export.cli import main
    from tiny_models import tiny_model_of

    folder = tmp_path / model_type
    tiny_model_of(model_type, head_dim=16).save_pretrained(folder)
    calib = ["--ratio", "0.5", "--calib", "random", "--calib-samples", "4", "--seq-len", "16", "--quiet"]
    code = main(["--model", str(folder), *calib, "--attention", "auto", "-o", str(tmp_path / "auto"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"] is True and report["attention"] == expected
    if expected == "plain":
        assert main(["--model", str(folder), *calib, "--attention", "gqa", "-o", str(tmp_path / "gqa")]) == 2
        assert "does not compute its attention" in capsys.readouterr().err

"""The layer-streamed export (mone_export.streamed_export) against the whole-model export of the same pruned model.

Both graphs run in ONNX Runtime on the same inputs (a prefill through a non-empty cache): every output (logits and
``present.*``) must agree to 1e-6, with the same inputs, outputs, initializer names and weight bytes. The
whole-model export itself is checked against PyTorch in test_export.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from mone_export import apply_plan, collect_stats, load_model, plan_pruning
from mone_export.adapters import moe_layers_or_error
from mone_export.export import export_onnx, lower_bound_bytes, weight_bytes
from mone_export.loading import bundled_model_path
from mone_export.streamed_export import export_onnx_streamed
from mone_export.streaming import LayerStreamedModel
from tiny_models import FAMILIES, tiny_batches, tiny_model

ort = pytest.importorskip("onnxruntime")

STREAMED_ATOL = 1e-6

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def random_feeds(sess, vocab, batch=2, seq=5, past=4, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in sess.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
        elif value.name == "attention_mask":
            mask = np.ones((batch, past + seq), np.int64)
            mask[1, :2] = 0  # a left-padded row: the mask path is exercised too
            feeds[value.name] = mask
        elif value.name == "position_ids":
            feeds[value.name] = np.tile(np.arange(past, past + seq), (batch, 1)).astype(np.int64)
        else:
            shape = [batch if d == "batch_size" else past if d == "past_sequence_length" else d for d in value.shape]
            dtype = np.float16 if value.type == "tensor(float16)" else np.float32
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def assert_same_graph_function(whole, streamed, vocab, atol=STREAMED_ATOL):
    a, b = session(whole), session(streamed)
    assert [i.name for i in a.get_inputs()] == [i.name for i in b.get_inputs()]
    assert [o.name for o in a.get_outputs()] == [o.name for o in b.get_outputs()]
    assert [i.shape for i in a.get_inputs()] == [i.shape for i in b.get_inputs()]
    feeds = random_feeds(a, vocab)
    for name, x, y in zip([o.name for o in a.get_outputs()], a.run(None, feeds), b.run(None, feeds)):
        assert x.shape == y.shape, name
        diff = float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max())
        assert diff <= atol, (name, diff)


def initializer_names(path):
    return {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def make_plan(model, family, variant):
    if variant == "unpruned":
        return None
    stats = collect_stats(model, tiny_batches(vocab_size=model.config.vocab_size), progress=False)
    if variant == "mone":
        return plan_pruning(stats, 0.5, method="mone")
    plan = plan_pruning(stats, 1 / 3 if family == "deepseek_v2" else 0.5, method="frequency")
    if family == "deepseek_v2":  # group-limited routing: one expert from every group
        pruned = {}
        for layer in moe_layers_or_error(model)[1]:
            groups = int(getattr(layer.router, "num_group", 1) or 1)
            size = layer.num_experts // groups
            freq = stats.layers[layer.index].frequency
            pruned[layer.index] = [g * size + int(np.argmin(freq[g * size:(g + 1) * size])) for g in range(groups)]
        plan = dataclasses.replace(plan, pruned=pruned)
    return plan


def export_both(folder, plan, out, dtype=torch.float32):
    """``(pruned model, whole-model export, streamed export)`` of the checkpoint in ``folder`` pruned by ``plan``,
    both loaded in ``dtype`` (a model loaded in float16 keeps float32 rotary frequencies: both exports see that)."""
    pruned, _ = load_model(folder, dtype=dtype)
    if plan is not None:
        apply_plan(pruned, plan)
    whole = export_onnx(pruned, out / "whole", dtype=dtype, progress=False)
    streamed = export_onnx_streamed(LayerStreamedModel(folder, dtype=dtype), out / "streamed", plan, progress=False)
    return pruned, whole, streamed


@pytest.mark.parametrize("variant", ["unpruned", "mone", "remove"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_export_computes_the_whole_model_export(family, variant, tmp_path):
    folder = tmp_path / "checkpoint"
    model = tiny_model(family)
    model.save_pretrained(folder, max_shard_size="50KB")
    model, _ = load_model(folder)
    plan = make_plan(model, family, variant)
    pruned, whole, streamed = export_both(folder, plan, tmp_path)
    onnx.checker.check_model(str(streamed), full_check=True)
    assert_same_graph_function(whole, streamed, model.config.vocab_size)
    assert initializer_names(streamed) == initializer_names(whole)  # no pruned expert's weight, same names
    assert (streamed.parent / "model.onnx.data").is_file()
    assert weight_bytes(streamed) <= 1.005 * lower_bound_bytes(pruned)
    assert weight_bytes(streamed) == weight_bytes(whole)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_streamed_fused_form_computes_the_whole_model_fused_export(family, tmp_path):
    """The GPU form (one com.microsoft.MoE node per layer) streams too: same function, names and bytes."""
    import collections

    folder = tmp_path / "checkpoint"
    tiny_model(family).save_pretrained(folder)
    model, _ = load_model(folder)
    plan = make_plan(model, family, "mone")
    pruned, _ = load_model(folder)
    apply_plan(pruned, plan)
    whole = export_onnx(pruned, tmp_path / "whole", moe_form="fused", progress=False)
    streamed = export_onnx_streamed(LayerStreamedModel(folder), tmp_path / "streamed", plan, progress=False,
                                    moe_form="fused")
    onnx.checker.check_model(str(streamed), full_check=True)
    ops = collections.Counter(n.op_type for n in onnx.load(str(streamed), load_external_data=False).graph.node)
    assert ops["MoE"] == len(moe_layers_or_error(pruned)[1]) and ops["NonZero"] == 0
    assert_same_graph_function(whole, streamed, model.config.vocab_size)
    assert initializer_names(streamed) == initializer_names(whole)
    assert weight_bytes(streamed) == weight_bytes(whole)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v2", "qwen2_moe", "olmoe"])
def test_bundled_models_stream_to_the_whole_model_export(name, tmp_path):
    model, _ = load_model(name)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (2, 32), generator=gen) for _ in range(2)]
    plan = plan_pruning(collect_stats(model, batches, progress=False), 0.5, "mone")
    pruned, whole, streamed = export_both(bundled_model_path(name), plan, tmp_path)
    assert_same_graph_function(whole, streamed, model.config.vocab_size)
    assert weight_bytes(streamed) <= 1.005 * lower_bound_bytes(pruned)


def test_streamed_export_is_byte_identical_run_to_run(tmp_path):
    folder = tmp_path / "checkpoint"
    model = tiny_model("deepseek_v2")  # MLA cache packing, the rotary patch, a dense first layer
    model.save_pretrained(folder)
    plan = make_plan(model, "deepseek_v2", "mone")
    first = export_onnx_streamed(LayerStreamedModel(folder), tmp_path / "a", plan, progress=False)
    second = export_onnx_streamed(LayerStreamedModel(folder), tmp_path / "b", plan, progress=False)
    assert first.read_bytes() == second.read_bytes()
    data = "model.onnx.data"
    assert (first.parent / data).read_bytes() == (second.parent / data).read_bytes()


def test_pieces_traced_through_a_file_give_the_same_bytes(tmp_path, monkeypatch):
    """Pieces of 1 GiB or more go through a file (protobuf's 2 GiB limit), smaller ones through memory: one export."""
    from mone_export import streamed_export

    folder = tmp_path / "checkpoint"
    model = tiny_model("qwen2_moe")  # a shared expert and its gate
    model.save_pretrained(folder)
    plan = make_plan(model, "qwen2_moe", "mone")
    in_memory = export_onnx_streamed(LayerStreamedModel(folder), tmp_path / "a", plan, progress=False)
    monkeypatch.setattr(streamed_export, "PIECE_BUFFER_LIMIT_BYTES", 0)
    through_file = export_onnx_streamed(LayerStreamedModel(folder), tmp_path / "b", plan, progress=False)
    assert in_memory.read_bytes() == through_file.read_bytes()
    data = "model.onnx.data"
    assert (in_memory.parent / data).read_bytes() == (through_file.parent / data).read_bytes()
    assert not [p.name for p in (tmp_path / "b").iterdir() if p.name not in ("model.onnx", data)]  # no piece left


def test_fp16_streamed_export_matches_the_fp16_whole_export(tmp_path):
    folder = tmp_path / "checkpoint"
    model = tiny_model("mixtral")
    model.save_pretrained(folder)
    plan = make_plan(model, "mixtral", "mone")
    _, whole, streamed = export_both(folder, plan, tmp_path, dtype=torch.float16)
    assert session(streamed).get_inputs()[3].type == "tensor(float16)"
    assert_same_graph_function(whole, streamed, model.config.vocab_size, atol=0.0)


@pytest.mark.parametrize("variant", ["unpruned", "mone", "remove"])
def test_a_bf16_checkpoint_exports_to_fp32_and_fp16(variant, tmp_path):
    """A bf16 layer is pruned before it is widened: the result must still be the fp32 (fp16) model's, pruned, with
    the novice means in the export dtype, not rounded to bf16."""
    folder = tmp_path / "checkpoint"
    tiny_model("qwen3_moe").to(torch.bfloat16).save_pretrained(folder)
    plan = make_plan(load_model(folder)[0], "qwen3_moe", variant)
    for dtype in (torch.float32, torch.float16):
        _, whole, streamed = export_both(folder, plan, tmp_path / str(dtype), dtype=dtype)
        assert session(streamed).get_inputs()[3].type == ("tensor(float)" if dtype == torch.float32
                                                          else "tensor(float16)")
        assert_same_graph_function(whole, streamed, 97, atol=0.0)


def test_a_streamed_layer_holds_only_its_pruned_weights(tmp_path):
    """Pruned as it is loaded: while the block runs, the pruned experts' weights are on ``meta`` (freed) and the
    novices' means are in the compute dtype; after it, the layer is released whole."""
    from mone_export.novices import NoviceExperts

    folder = tmp_path / "checkpoint"
    tiny_model("mixtral").to(torch.bfloat16).save_pretrained(folder)
    plan = make_plan(load_model(folder)[0], "mixtral", "mone")
    streamed = LayerStreamedModel(folder)
    moe = streamed.moe_layers[0]
    original = moe.experts
    with streamed.loaded_layer(moe.index, plan) as layer:
        pruned = getattr(moe.block, streamed.adapter.experts_attr)
        assert isinstance(pruned, NoviceExperts) and len(pruned.novice_ids) == len(plan.pruned[moe.index])
        assert all(p.is_meta for p in original.parameters())  # the full experts' weights are gone
        assert all(not p.is_meta and p.dtype == torch.float32 for p in layer.parameters())
        assert pruned.novice_means.dtype == torch.float32
        expected = plan.novices[moe.index].to(torch.float32).reshape(len(pruned.novice_ids), -1)
        assert torch.equal(pruned.novice_means, expected)
    assert getattr(moe.block, streamed.adapter.experts_attr) is original
    assert all(p.is_meta for p in layer.parameters())


def test_only_one_decoder_layer_is_in_memory_while_exporting(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint"
    model = tiny_model("olmoe", num_hidden_layers=3)
    model.save_pretrained(folder)
    streamed = LayerStreamedModel(folder)
    loaded_counts = []
    original = type(streamed).loaded_layer

    def watching(self, index, plan=None):
        loaded_counts.append(sum(not p.is_meta for layer in self.decoder_layers for p in layer.parameters())
                             / sum(1 for _ in self.decoder_layers[index].parameters()))
        return original(self, index, plan)

    monkeypatch.setattr(type(streamed), "loaded_layer", watching)
    export_onnx_streamed(streamed, tmp_path / "out", progress=False)
    assert loaded_counts == [0, 0, 0]  # nothing resident when the next layer is loaded
    assert all(p.is_meta for layer in streamed.decoder_layers for p in layer.parameters())


def test_middle_pieces_are_traced_from_the_first_pieces_embeddings(tmp_path, monkeypatch):
    """A middle piece reads ``inputs_embeds`` (the first piece's embedding output), so only the first and the last
    piece serialise the embedding table; the stitched graph still computes the whole-model export."""
    from mone_export import streamed_export

    folder = tmp_path / "checkpoint"
    model = tiny_model("olmoe", num_hidden_layers=4)
    model.save_pretrained(folder)
    table = tuple(model.get_input_embeddings().weight.shape)
    holds_table = []
    original = streamed_export._traced_piece

    def recording(*args, **kwargs):
        piece = original(*args, **kwargs)
        holds_table.append(any(tuple(v.shape) == table for v in piece.graph.initializers.values()))
        return piece

    monkeypatch.setattr(streamed_export, "_traced_piece", recording)
    plan = make_plan(load_model(folder)[0], "olmoe", "mone")
    pruned, whole, streamed = export_both(folder, plan, tmp_path)
    assert holds_table == [True, False, False, True]
    assert_same_graph_function(whole, streamed, model.config.vocab_size)
    assert initializer_names(streamed) == initializer_names(whole)
    ops = [n.op_type for n in onnx.load(str(streamed), load_external_data=False).graph.node]
    assert ops.count("Gather") == [n.op_type for n in onnx.load(str(whole), load_external_data=False).graph.node
                                   ].count("Gather")  # one embedding lookup, no prologue copied per piece


def test_a_prologue_value_the_first_piece_lacks_comes_from_the_piece_itself(tmp_path, monkeypatch):
    """With nothing matched to the first piece's prologue (as for a value only the last piece's epilogue reads),
    every later piece brings in its own prologue nodes, computed from the same graph inputs: same function."""
    from mone_export import streamed_export

    folder = tmp_path / "checkpoint"
    model = tiny_model("deepseek_v2", num_hidden_layers=3)  # MLA cache unpacking and a dense first layer
    model.save_pretrained(folder)
    original = streamed_export._Stitcher.add_piece

    def forgetting(self, graph, cut, index, first, embeddings_scope=None):
        if not first:
            self.prologue_values.clear()
        original(self, graph, cut, index, first, embeddings_scope)

    monkeypatch.setattr(streamed_export._Stitcher, "add_piece", forgetting)
    plan = make_plan(load_model(folder)[0], "deepseek_v2", "mone")
    pruned, whole, streamed = export_both(folder, plan, tmp_path)
    assert_same_graph_function(whole, streamed, model.config.vocab_size)
    assert initializer_names(streamed) == initializer_names(whole)
    ops = [n.op_type for n in onnx.load(str(streamed), load_external_data=False).graph.node]
    whole_ops = [n.op_type for n in onnx.load(str(whole), load_external_data=False).graph.node]
    assert len(ops) > len(whole_ops)  # the later pieces' own prologue nodes are there


# --- layer-streamed validation (teacher forcing) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def streamed_mixtral(tmp_path_factory):
    """The bundled Mixtral, MoNE-pruned: (in-memory pruned model, tokenizer, plan, streamed model, pruned export,
    unpruned export), the exports written layer-streamed."""
    root = tmp_path_factory.mktemp("streamed-validation")
    model, tokenizer = load_model("mixtral")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (2, 32), generator=gen) for _ in range(2)]
    plan = plan_pruning(collect_stats(model, batches, progress=False), 0.5, "mone")
    streamed = LayerStreamedModel(bundled_model_path("mixtral"))
    pruned = export_onnx_streamed(streamed, root / "pruned", plan, progress=False)
    unpruned = export_onnx_streamed(streamed, root / "unpruned", None, progress=False)
    apply_plan(model, plan)
    return model, tokenizer, plan, streamed, pruned, unpruned


def test_streamed_validation_passes_and_agrees_with_in_memory_validation(streamed_mixtral):
    from mone_export.streamed_validation import StreamedValidationOptions, validate_streamed
    from mone_export.validate import validate_export

    model, tokenizer, plan, streamed, pruned, unpruned = streamed_mixtral
    options = StreamedValidationOptions(new_tokens=12, baseline_dir=unpruned.parent, prefill_tokens=32,
                                        prefill_repeats=2, decode_repeats=5)
    report = validate_streamed(pruned.parent, streamed, plan, tokenizer, options)
    assert report["passed"], report["failures"]
    assert [row["output"] for row in report["logits"]][:2] == ["logits at prefill", "logits at decode step 1"]
    in_memory = validate_export(pruned.parent, model, tokenizer=tokenizer, new_tokens=12, latency=False)
    # ONNX Runtime's greedy tokens, checked position by position, are those model.generate produces in memory.
    assert [r["onnx"] for r in report["generation"]["per_prompt"]] == \
        [r["torch"] for r in in_memory["generation"]["per_prompt"]]
    assert report["memory"]["lower_bound_bytes"] == lower_bound_bytes(model) == in_memory["memory"]["lower_bound_bytes"]
    assert "onnx_unpruned" in report["latency"] and "pytorch" not in report["latency"]


def test_streamed_validation_fails_an_export_of_other_weights(streamed_mixtral):
    from mone_export.streamed_validation import StreamedValidationOptions, validate_streamed

    _, tokenizer, plan, streamed, _, unpruned = streamed_mixtral
    options = StreamedValidationOptions(new_tokens=8, memory=False, latency=False)
    report = validate_streamed(unpruned.parent, streamed, plan, tokenizer, options)  # the plan was not applied
    assert not report["passed"]
    assert any(f["output"] == "logits at prefill" for f in report["failures"])

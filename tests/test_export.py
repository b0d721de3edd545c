"""ONNX export with KV cache (docs/graph.md): ORT parity, greedy tokens, graph form, bytes, determinism, folder.

Every family × {unpruned, MoNE-pruned, removal-pruned} is exported once per session (``exports`` fixture) and
shared by the tests.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper

from mone_export import apply_plan, collect_stats, plan_pruning
from mone_export.adapters import moe_layers_or_error
from mone_export.export import (
    cache_shapes,
    export_onnx,
    input_names,
    lower_bound_bytes,
    output_names,
    routing_weights_names,
    weight_bytes,
)
from mone_export.moe_export_forward import export_friendly_moe
from mone_export.output_folder import GENAI_CONFIG, write_output_folder
from tiny_models import FAMILIES, tiny_batches, tiny_model

ort = pytest.importorskip("onnxruntime")

VARIANTS = ("unpruned", "mone", "remove")
FP32_ATOL = 1e-4
FP16_ATOL = 2e-2


# --- building the models and exports (once per session) -----------------------------------------------------------


def _group_removal(plan, stats, model):
    """A removal plan that group-limited routing accepts: the least frequent expert of every group of every layer."""
    pruned = {}
    for layer in moe_layers_or_error(model)[1]:
        groups = int(getattr(layer.router, "num_group", 1) or 1)
        size = layer.num_experts // groups
        freq = stats.layers[layer.index].frequency
        pruned[layer.index] = [g * size + int(np.argmin(freq[g * size:(g + 1) * size])) for g in range(groups)]
    return dataclasses.replace(plan, pruned=pruned)


def build_model(family: str, variant: str):
    """``(model, plan)``: the tiny model of ``family``, pruned as ``variant`` says (plan None when unpruned)."""
    model = tiny_model(family)
    if variant == "unpruned":
        return model, None
    stats = collect_stats(model, tiny_batches(), progress=False)
    if variant in ("mone", "mone-zero"):
        plan = plan_pruning(stats, 0.5, method=variant)
    elif family == "deepseek_v2":
        plan = _group_removal(plan_pruning(stats, 1 / 3, method="frequency"), stats, model)
    else:
        plan = plan_pruning(stats, 0.5, method="frequency")
    apply_plan(model, plan)
    return model, plan


@dataclasses.dataclass
class Export:
    family: str
    variant: str
    model: torch.nn.Module
    plan: object
    path: object
    seconds: float
    _session: object = None

    @property
    def session(self):
        if self._session is None:
            self._session = make_session(self.path)
        return self._session


def make_session(path):
    """One thread, no spinning: the tiny models gain nothing from more, and the test machine is shared."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """``exports(family, variant) -> Export``, each exported at most once per session."""
    import time

    cache = {}
    root = tmp_path_factory.mktemp("exports")

    def get(family, variant):
        if (family, variant) not in cache:
            model, plan = build_model(family, variant)
            started = time.perf_counter()
            path = export_onnx(model, root / f"{family}-{variant}", progress=False)
            cache[family, variant] = Export(family, variant, model, plan, path, time.perf_counter() - started)
        return cache[family, variant]

    return get


# --- running the ONNX model -------------------------------------------------------------------------------------


def empty_past(session, batch, dtype=np.float32):
    feeds = {}
    for value in session.get_inputs()[3:]:
        _, heads, _, dim = value.shape
        feeds[value.name] = np.zeros((batch, heads, 0, dim), dtype=dtype)
    return feeds


def ort_step(session, ids, mask, positions, past):
    outputs = session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past})
    names = [value.name.replace("past_key_values", "present") for value in session.get_inputs()[3:]]
    present = dict(zip(names, outputs[1:]))
    return outputs[0], {v.name: present[v.name.replace("past_key_values", "present")] for v in session.get_inputs()[3:]}


def prefill_and_decode(session, model, batch=2, seq=7, steps=3, seed=0, dtype=np.float32):
    """Max |Δlogits| of ORT vs PyTorch for a prefill then ``steps`` decode steps through the KV cache."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    positions = torch.arange(seq).expand(batch, seq)
    diffs = []
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits, past = ort_step(session, ids.numpy(), mask.numpy(), positions.numpy(), empty_past(session, batch, dtype))
        diffs.append(float(np.abs(logits.astype(np.float32) - ref.logits.float().numpy()).max()))
        cache = ref.cache
        for step in range(steps):
            nxt = torch.randint(0, vocab, (batch, 1), generator=gen)
            mask = torch.ones(batch, seq + step + 1, dtype=torch.long)
            positions = torch.full((batch, 1), seq + step)
            ref = model(input_ids=nxt, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            cache = ref.cache
            logits, past = ort_step(session, nxt.numpy(), mask.numpy(), positions.numpy(), past)
            diffs.append(float(np.abs(logits.astype(np.float32) - ref.logits.float().numpy()).max()))
    return diffs


def ort_greedy(session, prompt, new_tokens, eos=()):
    ids = np.array([prompt], dtype=np.int64)
    total = len(prompt)
    logits, past = ort_step(session, ids, np.ones((1, total), np.int64), np.arange(total)[None], empty_past(session, 1))
    out = []
    for _ in range(new_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in eos:
            break
        logits, past = ort_step(session, np.array([[token]]), np.ones((1, total + 1), np.int64), np.array([[total]]), past)
        total += 1
    return out


def torch_greedy(model, prompt, new_tokens):
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def eos_ids(model):
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


PROMPTS = ([5, 17, 33, 2, 60, 41, 8], [88, 1, 42])  # the second holds olmoe's pad id: generate gets a mask of ones


# --- parity --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_ort_logits_match_pytorch_prefill_and_decode(exports, family, variant):
    export = exports(family, variant)
    diffs = prefill_and_decode(export.session, export.model)
    assert max(diffs) <= FP32_ATOL, f"{family}/{variant}: max |Δlogits| per step {diffs} > {FP32_ATOL}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_generate(exports, family, variant):
    export = exports(family, variant)
    prompt = PROMPTS[VARIANTS.index(variant) % len(PROMPTS)]  # one generate() per export: it costs ~1 s
    expected = torch_greedy(export.model, prompt, 16)
    assert ort_greedy(export.session, prompt, 16, eos_ids(export.model)) == expected


def test_left_padded_batch_matches_pytorch(exports):
    """A batch with left padding (attention_mask zeros, positions from the mask) prefills and decodes like PyTorch."""
    export = exports("qwen2_moe", "mone")
    model, session = export.model, export.session
    ids = torch.tensor([[0, 0, 0, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits, past = ort_step(session, ids.numpy(), mask.numpy(), positions.numpy(), empty_past(session, 2))
        valid = mask.bool().numpy()
        assert np.abs(logits - ref.logits.numpy())[valid].max() <= FP32_ATOL
        nxt = torch.tensor([[11], [12]])
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        positions = positions[:, -1:] + 1
        ref = model(input_ids=nxt, attention_mask=mask, position_ids=positions, cache=ref.cache,
                    use_cache=True)
        logits, _ = ort_step(session, nxt.numpy(), mask.numpy(), positions.numpy(), past)
        assert np.abs(logits - ref.logits.numpy()).max() <= FP32_ATOL


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_export_friendly_forward_equals_eager(exports, family, variant):
    model = exports(family, variant).model
    tokens = tiny_batches(seed=5)[0]
    with torch.no_grad():
        eager = model(tokens).logits
        with export_friendly_moe(model):
            dispatched = model(tokens).logits
    torch.testing.assert_close(dispatched, eager, rtol=0, atol=1e-6)


# --- the graph -----------------------------------------------------------------------------------------------------


def _consumers(graph):
    users = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def dispatch_counts(proto, w_name):
    """(NonZero expert dispatches, bias MatMuls) reading routing weights ``w_name``."""
    users = _consumers(proto.graph)
    dispatches = biases = 0
    for gather in users.get(w_name, []):
        if gather.op_type != "Gather":
            continue
        for node in users.get(gather.output[0], []):
            if node.op_type == "Greater" and any(n.op_type == "NonZero" for n in users.get(node.output[0], [])):
                dispatches += 1
            if node.op_type == "MatMul":
                biases += 1
    return dispatches, biases


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_graph_form_after_passes(exports, family, variant):
    """Per MoE layer: one dispatch per real expert, one novice bias MatMul iff novices, no NonZero for novices."""
    export = exports(family, variant)
    proto = onnx.load(str(export.path))
    _, layers = moe_layers_or_error(export.model)
    for layer, w_name in zip(layers, routing_weights_names(export.model)):
        novices = list(getattr(layer.experts, "novice_ids", []))
        real = layer.num_experts - len(novices)
        assert dispatch_counts(proto, w_name) == (real, 1 if novices else 0), (layer.index, w_name)
    assert sum(n.op_type == "NonZero" for n in proto.graph.node) == sum(
        l.num_experts - len(getattr(l.experts, "novice_ids", [])) for l in layers
    )
    names = {t.name for t in proto.graph.initializer}
    assert not any(n.startswith("onnx::") for n in names), "every weight is named after its parameter"
    onnx.checker.check_model(str(export.path), full_check=True)


def test_mone_zero_novices_share_one_constant_and_still_fold(exports):
    """mone-zero novices are equal (zero) vectors, which the exporter shares through Identity nodes."""
    export = exports("olmoe", "mone-zero")
    proto = onnx.load(str(export.path))
    _, layers = moe_layers_or_error(export.model)
    for layer, w_name in zip(layers, routing_weights_names(export.model)):
        assert dispatch_counts(proto, w_name) == (layer.num_experts - len(layer.experts.novice_ids), 1)
    assert max(prefill_and_decode(export.session, export.model, steps=1)) <= FP32_ATOL


def _digests(arrays):
    return {hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays}


@pytest.mark.parametrize("variant", ("mone", "remove"))
@pytest.mark.parametrize("family", FAMILIES)
def test_no_pruned_expert_weights_and_bytes_bound(exports, family, variant):
    export = exports(family, variant)
    original = exports(family, "unpruned").model
    proto = onnx.load(str(export.path))
    stored = _digests(numpy_helper.to_array(t) for t in proto.graph.initializer)
    _, layers = moe_layers_or_error(original)
    for layer in layers:
        for e in export.plan.pruned.get(layer.index, []):
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(layer.experts, name)[e].detach().numpy()
                assert not (_digests([w, w.T]) & stored), f"layer {layer.index} expert {e} {name} is in the graph"
    assert weight_bytes(export.path) <= 1.005 * lower_bound_bytes(export.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_weight_bytes_bound(exports, family):
    export = exports(family, "unpruned")
    assert weight_bytes(export.path) <= 1.005 * lower_bound_bytes(export.model)


def test_inputs_outputs_and_dynamic_dims(exports):
    for family in ("mixtral", "deepseek_v2"):
        export = exports(family, "mone")
        session = export.session
        layers = int(export.model.config.num_hidden_layers)
        assert [v.name for v in session.get_inputs()] == input_names(layers)
        assert [v.name for v in session.get_outputs()] == output_names(layers)
        specs = cache_shapes(export.model.config)
        for i, spec in enumerate(specs):
            key, value = session.get_inputs()[3 + 2 * i], session.get_inputs()[4 + 2 * i]
            assert key.shape == ["batch_size", spec.heads, "past_sequence_length", spec.key_dim]
            assert value.shape == ["batch_size", spec.heads, "past_sequence_length", spec.value_dim]
        assert session.get_inputs()[0].shape == ["batch_size", "sequence_length"]
        assert session.get_inputs()[1].shape == ["batch_size", "total_sequence_length"]
        proto = onnx.load(str(export.path))
        assert proto.ir_version == 10


def test_mla_cache_is_packed_latent():
    """DeepSeek-V2 caches its latent and rotary key (transformers 5.x MLA), packed into equal halves."""
    config = tiny_model("deepseek_v2").config
    spec = cache_shapes(config)[0]
    assert spec.mla == (config.kv_lora_rank, config.qk_rope_head_dim)
    assert spec.key_dim == spec.value_dim == (config.kv_lora_rank + config.qk_rope_head_dim + 1) // 2


# --- determinism, dtypes, external data, tied weights --------------------------------------------------------------


def test_reexport_is_byte_identical(exports, tmp_path):
    export = exports("deepseek_v2", "mone")  # novices, MLA cache, the rotary patch
    again = export_onnx(export.model, tmp_path / "again.onnx", progress=False)
    assert again.read_bytes() == export.path.read_bytes()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_fp16_export_runs_in_ort_cpu(exports, tmp_path, family):
    model = copy.deepcopy(exports(family, "mone").model)
    path = export_onnx(model, tmp_path, dtype="fp16", progress=False)
    proto = onnx.load(str(path))
    big_float32 = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and
                   np.prod(t.dims) >= 64]
    assert not big_float32, "float32 copies of fp16 weights (router, novice bias) are stored as fp16"
    half = model.half()  # the reference for an fp16 export: the same model in fp16 (a converted copy was exported)
    session = make_session(path)
    assert session.get_inputs()[3].type == "tensor(float16)"
    diffs = prefill_and_decode(session, half, dtype=np.float16)
    assert max(diffs) <= FP16_ATOL, diffs
    assert weight_bytes(path) <= 1.005 * lower_bound_bytes(half)


def test_external_data(exports, tmp_path):
    export = exports("olmoe", "mone")
    path = export_onnx(export.model, tmp_path / "model.onnx", external_data=True, progress=False)
    data = tmp_path / "model.onnx.data"
    assert data.is_file() and data.stat().st_size >= 0.99 * weight_bytes(export.path)
    assert path.stat().st_size < export.path.stat().st_size - 0.9 * weight_bytes(export.path)
    assert weight_bytes(path) == weight_bytes(export.path)
    onnx.load(str(path))  # the data file is referenced by its name, beside the model
    onnx.checker.check_model(str(path), full_check=True)
    session = make_session(path)
    assert max(prefill_and_decode(session, export.model, steps=1)) <= FP32_ATOL


def test_weights_read_from_a_removed_folder_are_written_in(exports, tmp_path):
    """A traced model over 2 GiB reads its weights from the exporter's scratch files; when the passes bring it under
    the threshold, the saved file must hold them, not point at the scratch folder that is then removed."""
    import shutil

    from mone_export.onnx_utils import save_model

    export = exports("olmoe", "mone")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    first = export_onnx(export.model, scratch / "model.onnx", external_data=True, progress=False)
    model = ir.load(first)  # initializers are references into scratch/model.onnx.data
    path = save_model(model, tmp_path / "model.onnx", external_data=False)
    shutil.rmtree(scratch)

    assert not (tmp_path / "model.onnx.data").exists()
    session = make_session(path)
    assert max(prefill_and_decode(session, export.model, steps=1)) <= FP32_ATOL


@pytest.mark.parametrize("external", [True, False])
def test_constants_read_from_a_removed_folder_are_written_in(tmp_path, external):
    """Over 2 GiB the exporter writes Constant-node tensors beside the trace too (the fused attention's rotary caches):
    they become initializers, which the saved model holds (in its .data file or inline), not references into the
    scratch folder that is then removed."""
    import shutil

    from onnx import TensorProto, helper

    from mone_export.onnx_utils import lift_external_constants, save_model

    table = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    node = helper.make_node("Constant", [], ["table"], value=numpy_helper.from_array(table, "table"))
    graph = helper.make_graph([node, helper.make_node("Add", ["x", "table"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 32])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    onnx.save_model(proto, scratch / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0, convert_attribute=True)  # what the TorchScript exporter does over 2 GiB
    model = ir.load(scratch / "model.onnx")
    assert lift_external_constants(model) == 1 and "table" in model.graph.initializers
    assert not any(n.op_type == "Constant" for n in model.graph)
    (tmp_path / "out").mkdir()
    path = save_model(model, tmp_path / "out" / "model.onnx", external_data=external)
    shutil.rmtree(scratch)

    x = np.ones((64, 32), np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(got, x + table)


def test_tied_embeddings_are_stored_once(tmp_path):
    model = tiny_model("qwen3_moe", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = export_onnx(model, tmp_path, progress=False)
    proto = onnx.load(str(path))
    embedding = model.model.embed_tokens.weight.detach().numpy()
    stored = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    assert sum(a.shape in (embedding.shape, embedding.T.shape) for a in stored) == 1
    assert weight_bytes(path) <= 1.005 * lower_bound_bytes(model)
    session = make_session(path)
    assert max(prefill_and_decode(session, model, steps=2)) <= FP32_ATOL


# --- export-time patches -------------------------------------------------------------------------------------------


def test_export_friendly_moe_restores_forward_even_on_error():
    model, _ = build_model("mixtral", "mone")
    _, layers = moe_layers_or_error(model)
    before = [l.experts.forward for l in layers]
    with export_friendly_moe(model):
        assert all("forward" in l.experts.__dict__ for l in layers)
    assert [l.experts.forward for l in layers] == before
    assert not any("forward" in l.experts.__dict__ for l in layers)
    with pytest.raises(RuntimeError, match="boom"):
        with export_friendly_moe(model):
            raise RuntimeError("boom")
    assert not any("forward" in l.experts.__dict__ for l in layers)


def test_export_leaves_the_model_as_it_was(tmp_path):
    import transformers.models.deepseek_v2.modeling_deepseek_v2 as modeling

    model = tiny_model("deepseek_v2")
    model.set_attn_implementation("sdpa")
    apply_rotary = modeling.apply_rotary_emb
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path, progress=False)
    assert model.config._attn_implementation == "sdpa" and model.training
    assert modeling.apply_rotary_emb is apply_rotary
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    session = make_session(path)
    assert max(prefill_and_decode(session, model.eval(), steps=1)) <= FP32_ATOL  # traced eager == run sdpa


# --- the output folder ---------------------------------------------------------------------------------------------


def tiny_tokenizer(vocab_size: int):
    """A character-level fast tokenizer with ``vocab_size`` tokens (ids 0-2 are special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(33, 33 + vocab_size - 3)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_output_folder_runs_in_onnxruntime_genai(exports, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    export = exports("mixtral", "mone")
    tokenizer = tiny_tokenizer(int(export.model.config.vocab_size))
    out = write_output_folder(export.model, tokenizer, export.path, tmp_path / "out", plan=export.plan)
    files = set(os.listdir(out))
    assert {"model.onnx", "config.json", "generation_config.json", GENAI_CONFIG, "tokenizer.json", "plan"} <= files
    config = json.loads((out / GENAI_CONFIG).read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == export.model.config.num_key_value_heads
    assert config["search"]["past_present_share_buffer"] is False
    model = og.Model(str(out))
    for prompt in PROMPTS:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + 16, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([prompt], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        tokens = [int(t) for t in generator.get_sequence(0)[len(prompt):]]
        assert tokens == torch_greedy(export.model, prompt, 16)


def _bundled():
    from mone_export.loading import BUNDLED_MODELS, bundled_model_path

    return next((name for name in BUNDLED_MODELS if bundled_model_path(name) is not None), None)


@pytest.mark.skipif(_bundled() is None, reason="no bundled model under models/")
def test_bundled_model_folder_generates_text_in_genai(tmp_path):
    """A real checkpoint with its BPE tokenizer: genai's tokenizer and greedy text equal transformers'."""
    og = pytest.importorskip("onnxruntime_genai")
    from mone_export import load_model

    model, tokenizer = load_model(_bundled())
    batch = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n" * 4, return_tensors="pt").input_ids
    plan = plan_pruning(collect_stats(model, [batch], progress=False), 0.5, method="mone")
    apply_plan(model, plan)
    out = write_output_folder(model, tokenizer, None, tmp_path / "out", plan=plan)
    prompt = "import os\n\ndef main("
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = torch_greedy(model, ids[0].tolist(), 24)
    genai_model = og.Model(str(out))
    genai_tokenizer = og.Tokenizer(genai_model)
    tokens = genai_tokenizer.encode(prompt)
    assert [int(t) for t in tokens] == ids[0].tolist()
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=len(tokens) + 24, do_sample=False)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(tokens)
    while not generator.is_done():
        generator.generate_next_token()
    generated = [int(t) for t in generator.get_sequence(0)[len(tokens):]]
    assert generated == expected
    assert genai_tokenizer.decode(np.array(generated, dtype=np.int32)) == tokenizer.decode(expected)


def test_genai_config_packs_mla_and_skips_bad_token_ids():
    from mone_export.output_folder import genai_config

    model = tiny_model("deepseek_v2")
    decoder = genai_config(model)["model"]["decoder"]
    assert decoder["head_size"] == cache_shapes(model.config)[0].key_dim and decoder["num_key_value_heads"] == 1
    olmoe = genai_config(tiny_model("olmoe"))  # its tiny config keeps eos 50279 from the real vocabulary
    assert "eos_token_id" not in olmoe["model"]


def test_failed_write_keeps_previous_folder(exports, tmp_path, monkeypatch):
    export = exports("mixtral", "mone")
    out = tmp_path / "out"
    write_output_folder(export.model, None, export.path, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    import mone_export.output_folder as folder

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(folder, "genai_config", fail)  # model.onnx and config.json are already written then
    with pytest.raises(OSError, match="disk full"):
        write_output_folder(export.model, None, export.path, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    monkeypatch.undo()
    with pytest.raises(ValueError, match="report failed"):
        def extra(folder_path):
            (folder_path / "report.json").write_text("{}")
            raise ValueError("report failed")

        write_output_folder(export.model, None, None, out, overwrite=True, extra_files=extra)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

"""Layer-streamed loading and calibration: the same statistics as in memory, one decoder layer resident at a time."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mone_export import collect_stats, load_model, plan_pruning
from mone_export.errors import UsageError
from mone_export.loading import bundled_model_path
from mone_export.streaming import LayerStreamedModel, collect_stats_streamed
from tiny_models import FAMILIES, tiny_batches, tiny_model

BUNDLED = [name for name in ("mixtral", "qwen2_moe", "olmoe", "deepseek_v2") if bundled_model_path(name)]


def assert_same_stats(a, b) -> None:
    """Every per-expert statistic equal to 1e-9 relative (in practice the streamed numbers are bit-identical)."""
    assert sorted(a.layers) == sorted(b.layers)
    for index in a.layers:
        for name, value in vars(a.layers[index]).items():
            if isinstance(value, np.ndarray):
                np.testing.assert_allclose(getattr(b.layers[index], name), value, rtol=1e-9, atol=0,
                                           err_msg=f"layer {index} {name}")
            else:
                assert getattr(b.layers[index], name) == value, (index, name)
    assert a.experts_fingerprints == b.experts_fingerprints and a.num_tokens == b.num_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_of_every_family_stream_to_the_same_statistics(family, tmp_path):
    folder = tmp_path / family
    tiny_model(family, seed=0).save_pretrained(folder, max_shard_size="50KB")  # sharded, with an index
    assert (folder / "model.safetensors.index.json").is_file()
    model, _ = load_model(folder)
    vocab = model.config.vocab_size
    batches = tiny_batches(vocab_size=vocab, num=3, batch=2, seq=11)
    in_memory = collect_stats(model, batches, progress=False)
    streamed = collect_stats_streamed(LayerStreamedModel(folder), batches, progress=False)
    assert_same_stats(in_memory, streamed)
    assert plan_pruning(in_memory, 0.5, "mone").pruned == plan_pruning(streamed, 0.5, "mone").pruned


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_removal_errors_stream_to_the_same_values(family, tmp_path):
    """The removal error (method auto) measured one decoder layer at a time equals the in-memory measurement
    (deepseek_v2's group-limited layers: inf on both sides)."""
    folder = tmp_path / family
    tiny_model(family, seed=0).save_pretrained(folder)
    model, _ = load_model(folder)
    batches = tiny_batches(vocab_size=model.config.vocab_size, num=2, batch=2, seq=11)
    in_memory = collect_stats(model, batches, progress=False, measure_removal=True)
    streamed = collect_stats_streamed(LayerStreamedModel(folder), batches, progress=False, measure_removal=True)
    assert_same_stats(in_memory, streamed)
    assert all(layer.measures_removal and layer.removal_sq_sum.any() for layer in streamed.layers.values())
    a, b = plan_pruning(in_memory, 0.5, "auto"), plan_pruning(streamed, 0.5, "auto")
    assert (a.pruned, a.removed) == (b.pruned, b.removed)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_models_stream_to_the_same_statistics(name):
    model, _ = load_model(name)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (2, 48), generator=gen) for _ in range(2)]
    assert_same_stats(collect_stats(model, batches, progress=False),
                      collect_stats_streamed(LayerStreamedModel(bundled_model_path(name)), batches, progress=False))


def test_only_one_decoder_layer_is_in_memory_at_a_time(tmp_path):
    folder = tmp_path / "mixtral"
    tiny_model("mixtral", seed=0).save_pretrained(folder)
    streamed = LayerStreamedModel(folder)
    assert all(p.is_meta for layer in streamed.decoder_layers for p in layer.parameters())
    assert not any(p.is_meta for name, p in streamed.model.named_parameters() if ".layers." not in name)
    resident = []
    original = streamed.loaded_layer

    def watching(index, plan=None):
        resident.append([i for i, layer in enumerate(streamed.decoder_layers)
                         if not next(layer.parameters()).is_meta])
        return original(index, plan)

    streamed.loaded_layer = watching
    collect_stats_streamed(streamed, tiny_batches(), progress=False)
    assert resident == [[] for _ in streamed.decoder_layers]  # nothing else resident when a layer is loaded
    assert all(p.is_meta for layer in streamed.decoder_layers for p in layer.parameters())  # all released after


def test_a_bf16_checkpoint_streams_in_its_dtype_with_float64_statistics(tmp_path):
    folder = tmp_path / "bf16"
    tiny_model("qwen3_moe", seed=0).to(torch.bfloat16).save_pretrained(folder)
    model, _ = load_model(folder, dtype="bf16")
    batches = tiny_batches(vocab_size=model.config.vocab_size)
    streamed = LayerStreamedModel(folder, dtype="bf16")
    assert streamed.dtype == torch.bfloat16
    stats = collect_stats_streamed(streamed, batches, progress=False)
    assert_same_stats(collect_stats(model, batches, progress=False), stats)
    assert next(iter(stats.layers.values())).mean.dtype == np.float64 and stats.experts_dtype == "bfloat16"


def _drop_tensor(folder, fragment):
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    name = next(n for n in sorted(tensors) if fragment in n)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    return name


def test_a_missing_tensor_is_named_not_random_initialised(tmp_path):
    folder = tmp_path / "broken"
    tiny_model("mixtral", seed=0).save_pretrained(folder)
    name = _drop_tensor(folder, "layers.1.self_attn.q_proj")
    streamed = LayerStreamedModel(folder)  # layer 1 is only read when it is needed
    with pytest.raises(UsageError, match=r"lacks tensors: model\.layers\.1\.self_attn\.q_proj\.weight"):
        collect_stats_streamed(streamed, tiny_batches(), progress=False)
    assert name == "model.layers.1.self_attn.q_proj.weight"


def test_a_missing_shard_is_named_before_anything_loads(tmp_path):
    folder = tmp_path / "sharded"
    tiny_model("olmoe", seed=0).save_pretrained(folder, max_shard_size="50KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    with pytest.raises(UsageError, match=shard):
        LayerStreamedModel(folder)


def test_streamed_calibration_peak_memory_does_not_grow_with_the_layer_count(tmp_path):
    """3 and 9 layers of the same width (36 MB each, bf16, one shard per layer): the peak RSS of the whole
    calibration process differs by at most about one layer (in memory it would differ by six)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("big_model", Path(__file__).parents[1] / "benchmarks" / "big_model.py")
    big_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(big_model)
    peaks, layer_bytes = {}, None
    for layers in (3, 9):
        folder = tmp_path / f"l{layers}"
        sizes = big_model.synthesize_checkpoint(folder, big_model.mixtral_config(layers, 512, 1408, 8))
        layer_bytes = sizes["largest_layer_bytes"]
        peaks[layers] = big_model.measure(folder, "streamed", samples=4, seq=64)["peak_rss_bytes"]
    assert peaks[9] - peaks[3] <= 1.5 * layer_bytes, (peaks, layer_bytes)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_hidden_states_spilled_to_disk_give_the_same_statistics_and_logits(family, tmp_path, monkeypatch):
    """Over the activation budget the hidden states between layers live in files (one per batch), read back in
    turn: statistics and streamed logits are bit-identical to the in-memory buffer's, and the files are removed."""
    from mone_export import streaming
    from mone_export.streaming import ActivationBuffer, streamed_logits

    folder = tmp_path / family
    tiny_model(family, seed=1).save_pretrained(folder)
    batches = tiny_batches(num=3, batch=2, seq=9, seed=2)
    streamed = LayerStreamedModel(folder)
    in_memory = collect_stats_streamed(streamed, batches, progress=False, activation_budget=1 << 40)
    writes = []
    real_put = ActivationBuffer.put

    def counting_put(self, index, hidden):
        real_put(self, index, hidden)
        writes.append((self.on_disk, sorted(p.name for p in self._folder.iterdir()) if self._folder else None))

    monkeypatch.setattr(ActivationBuffer, "put", counting_put)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    on_disk = collect_stats_streamed(streamed, batches, progress=False, activation_budget=0, scratch=scratch)
    layers = streamed.model.config.num_hidden_layers
    assert len(writes) == len(batches) * (layers + 1) and all(disk for disk, _ in writes)
    assert writes[-1][1] == ["0.pt", "1.pt", "2.pt"]  # one file per batch, replaced layer after layer
    assert_same_stats(in_memory, on_disk)
    for a, b in zip(streamed_logits(streamed, batches, progress=False, activation_budget=1 << 40),
                    streamed_logits(streamed, batches, progress=False, activation_budget=0, scratch=scratch)):
        assert torch.equal(a, b)
    assert list(scratch.iterdir()) == []  # the spill folders are gone
    assert streaming.ActivationBuffer(10, budget=None).on_disk is False  # 10 bytes fit any machine's budget


def test_calibration_compute_dtype_is_an_option(tmp_path):
    """``CalibrationOptions(dtype="bf16")`` calibrates in bf16 whatever the model was loaded in: the statistics of a
    fp32 model, of the same checkpoint streamed in fp32, and of the model loaded in bf16 are identical."""
    from mone_export.pipeline import CalibrationOptions, calibrate_and_plan

    calib = CalibrationOptions(source="random", samples=4, seq_len=16, batch_size=2, dtype="bf16")
    model, tokenizer = load_model("mixtral")
    plan, in_memory = calibrate_and_plan(model, tokenizer, 0.5, "mone", "layer", calib, progress=False)
    assert next(model.parameters()).dtype == torch.float32  # the model itself is not converted
    _, streamed = calibrate_and_plan(LayerStreamedModel(bundled_model_path("mixtral")), tokenizer, 0.5, "mone",
                                     "layer", calib, progress=False)
    bf16_model, _ = load_model("mixtral", dtype="bf16")
    _, native = calibrate_and_plan(bf16_model, tokenizer, 0.5, "mone", "layer", calib, progress=False)
    assert_same_stats(native, in_memory)
    assert_same_stats(native, streamed)
    assert in_memory.calibration["compute_dtype"] == "bf16"
    _, fp32 = calibrate_and_plan(model, tokenizer, 0.5, "mone", "layer",
                                 CalibrationOptions(source="random", samples=4, seq_len=16, batch_size=2),
                                 progress=False)
    assert not np.array_equal(fp32.layers[0].mean, in_memory.layers[0].mean)  # the option changed the compute


def test_a_bf16_layer_computed_in_fp32_is_loaded_narrow_then_widened_exactly(tmp_path, monkeypatch):
    """A bf16 checkpoint streamed in fp32 is loaded and fused in bf16, then widened parameter by parameter: the
    values equal transformers' own fp32 load, and so do the statistics."""
    folder = tmp_path / "bf16"
    tiny_model("mixtral", seed=3).to(torch.bfloat16).save_pretrained(folder)
    model, _ = load_model(folder)  # fp32, loaded whole by transformers
    streamed = LayerStreamedModel(folder)
    assert streamed.dtype == torch.float32
    loads = []
    real_load = LayerStreamedModel._load_keys

    def spy(self, keys, wanted, dtype=None):
        loads.append(dtype)
        return real_load(self, keys, wanted, dtype=dtype)

    monkeypatch.setattr(LayerStreamedModel, "_load_keys", spy)
    whole = dict(model.named_parameters())
    for index in range(model.config.num_hidden_layers):
        with streamed.loaded_layer(index) as layer:
            for name, parameter in layer.named_parameters():
                reference = whole[f"model.layers.{index}.{name}"]
                assert parameter.dtype == torch.float32 and torch.equal(parameter, reference), name
    assert loads == [torch.bfloat16] * model.config.num_hidden_layers
    batches = tiny_batches(num=2, batch=2, seq=7)
    assert_same_stats(collect_stats(model, batches, progress=False),
                      collect_stats_streamed(LayerStreamedModel(folder), batches, progress=False))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_mixed_plan_streams_to_the_in_memory_logits(family, tmp_path):
    """A mixed plan (some pruned experts removed, the others novices) applied one decoder layer at a time gives the
    logits of the whole model pruned in memory."""
    import dataclasses

    from mone_export import apply_plan
    from mone_export.streaming import streamed_logits

    folder = tmp_path / family
    tiny_model(family, seed=0).save_pretrained(folder)
    model, _ = load_model(folder)
    batches = tiny_batches(vocab_size=model.config.vocab_size, num=2, batch=2, seq=11)
    ne = plan_pruning(collect_stats(model, batches, progress=False), 0.5, "ne")
    removed = {index: experts[:1] for index, experts in ne.pruned.items()}
    mixed = dataclasses.replace(ne, removed=removed, novices={i: v[1:] for i, v in ne.novices.items()},
                                replacement="mixed")
    streamed = streamed_logits(LayerStreamedModel(folder), batches, plan=mixed, progress=False)
    apply_plan(model, mixed)
    with torch.no_grad():
        for batch, logits in zip(batches, streamed):
            torch.testing.assert_close(logits, model(input_ids=batch).logits.float(), rtol=0, atol=1e-5)

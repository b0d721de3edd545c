"""Train one of the bundled tiny Mixture-of-Experts checkpoints from scratch (one seeded recipe for every family).

    python models/train.py --family mixtral --out models/mixtral
    python models/train.py --family deepseek_v2 --out models/deepseek_v2 --steps 800 --seed 0

What it does, in order (everything offline; nothing is downloaded):

1. Trains a byte-level BPE tokenizer (``tokenizers``, vocabulary ``--vocab-size``, default 2048) on the
   TRAIN split of the built-in ``python-code`` source (the running Python's standard library, see
   :mod:`mone_export.calibration`) and wraps it as a ``PreTrainedTokenizerFast`` with
   ``<|endoftext|>`` as bos/eos (GPT-2 style: it separates documents, nothing is added
   automatically) and ``<|pad|>`` as pad.
2. Tokenizes that train split into one stream (documents joined by eos), cuts it into
   non-overlapping ``--seq-len`` chunks and visits them in a seeded random order, epoch after epoch.
3. Builds the family's transformers 5.x model from config (sizes in :data:`FAMILIES`, shared ones
   in :data:`COMMON`) with ``torch.manual_seed(seed)`` and trains it with AdamW (betas 0.9/0.95,
   weight decay 0.1 on matrices), linear warm-up then cosine decay to 10% of the peak learning rate,
   gradient clipping at 1.0, on ONE CPU thread. The loss is next-token cross-entropy plus
   ``router_aux_loss_coef`` times the Switch-style load-balancing loss of transformers'
   ``load_balancing_loss_func`` (what Mixtral/OLMoE/Qwen2-MoE add with
   ``output_router_logits=True``) computed for each MoE layer separately and averaged (see
   :func:`aux_loss`); applied identically to DeepSeek-V2, whose transformers class has none.
4. Saves a standard HF checkpoint (``config.json``, ``generation_config.json``,
   ``model.safetensors``, tokenizer files), reloads it with :func:`mone_export.load_model` and
   writes ``card.json`` / ``CARD.md``: parameters (total, active per token), data, steps, wall
   time, seed, the exact command, held-out perplexity on ``python-code`` and ``python-docs``
   (:mod:`evaluate` next to this file: 64 chunks x 128 tokens, seed 0, split "heldout"), and
   per-layer expert usage, router entropy and token/expert affinity on held-out ``python-code``.

``--family dense`` trains a dense Llama with the same attention and the Mixtral family's ACTIVE
feed-forward width (top_k x expert width) as a baseline; it is not a bundled model.

Same arguments, same machine, same library versions and ONE thread give the same weights
(the data is the running Python's standard library, so the Python version is part of the recipe
and is recorded in the card).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from mone_export import evaluate  # noqa: E402

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SOURCE = "python-code"
EVAL_SOURCES = ("python-code", "python-docs")
SAMPLE_PROMPT = "import os\n\n\ndef "

COMMON = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    initializer_range=0.02,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    output_router_logits=False,  # the training loop asks for router logits itself; inference stays lean
    router_aux_loss_coef=0.01,
)
"""Config fields shared by every family (vocabulary and special-token ids are added from the tokenizer)."""

FAMILIES = {
    "mixtral": dict(
        model_type="mixtral", head_dim=32, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
        router_jitter_noise=0.0,
    ),
    "qwen2_moe": dict(
        model_type="qwen2_moe", intermediate_size=256, moe_intermediate_size=128, shared_expert_intermediate_size=64,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
    ),
    "olmoe": dict(
        model_type="olmoe", intermediate_size=128, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
    ),
    "deepseek_v2": dict(
        model_type="deepseek_v2", intermediate_size=256, moe_intermediate_size=128, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, topk_method="greedy", n_group=1,
        topk_group=1, routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=32, num_key_value_heads=4,
    ),
    # Not bundled: the dense baseline with Mixtral's attention and its active FFN width (2 x 128).
    "dense": dict(model_type="llama", head_dim=32, intermediate_size=256, attention_bias=False, mlp_bias=False),
}

DEFAULT_STEPS = {"mixtral": 800, "qwen2_moe": 800, "olmoe": 800, "deepseek_v2": 650, "dense": 800}
"""Steps per family: what fits in about 6-7 minutes on one (shared) CPU thread at the default batch."""

PRESETS = {
    "bundled": {"common": {}, "families": {}, "steps": {}},
    # ~21M parameters, most of them in 16 routed experts per layer (as in real MoE models), ~4.6M active per
    # token: the models of benchmarks/larger_models.py, not bundled.
    "large": {
        "common": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4),
        "families": {
            "mixtral": dict(head_dim=32, intermediate_size=256, num_local_experts=16),
            "qwen2_moe": dict(intermediate_size=512, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                              num_experts=16),
            "olmoe": dict(intermediate_size=256, num_experts=16),
        },
        "steps": {"mixtral": 1500, "qwen2_moe": 1500, "olmoe": 1500},
    },
}
"""Size presets: overrides of :data:`COMMON` and :data:`FAMILIES` (``bundled`` is the bundled models' recipe)."""


# -- tokenizer -----------------------------------------------------------------------------------------


def train_tokenizer(vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on the train split of ``python-code``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from mone_export.calibration import iter_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(SOURCE, split="train"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, model_max_length=COMMON["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, out: Path) -> None:
    """Save with a ``tokenizer_class`` older readers know (transformers 5 writes ``TokenizersBackend``)."""
    tokenizer.save_pretrained(str(out))
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def train_stream(tokenizer) -> np.ndarray:
    """Every token of the train split of ``python-code``, documents joined by eos."""
    from mone_export.calibration import iter_texts, token_stream

    return token_stream(iter_texts(SOURCE, split="train"), tokenizer, max_tokens=1 << 40)


class ChunkSampler:
    """Non-overlapping ``seq_len`` chunks of the stream, visited in a seeded random order, epoch after epoch."""

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int):
        n = len(stream) // seq_len
        self.chunks = torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len).astype(np.int64))
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(n)
        self.pos = 0
        self.epochs = 0

    def next(self) -> torch.LongTensor:
        rows = []
        while len(rows) < self.batch_size:
            if self.pos == len(self.order):
                self.order = self.rng.permutation(len(self.chunks))
                self.pos = 0
                self.epochs += 1
            rows.append(int(self.order[self.pos]))
            self.pos += 1
        return self.chunks[rows]


# -- model -----------------------------------------------------------------------------------------------


def build_config(family: str, tokenizer, preset: str = "bundled"):
    import transformers

    sizes = PRESETS[preset]
    kwargs = {**COMMON, **sizes["common"], **FAMILIES[family], **sizes["families"].get(family, {})}
    model_type = kwargs.pop("model_type")
    if model_type == "llama":
        for key in ("output_router_logits", "router_aux_loss_coef"):
            kwargs.pop(key)
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return transformers.AutoConfig.for_model(model_type, **kwargs, **ids)


def build_model(config, seed: int):
    import transformers

    torch.manual_seed(seed)
    kwargs = {"attn_implementation": "sdpa"}
    if config.model_type != "llama":
        kwargs["experts_implementation"] = "eager"
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs)


def is_moe(model) -> bool:
    return model.config.model_type in FAMILIES and model.config.model_type != "llama"


def parameter_counts(model) -> dict[str, int]:
    """Total parameters, parameters active per token (top-k of the routed experts), and embedding parameters."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    inactive = 0
    if is_moe(model):
        from mone_export.adapters import moe_layers_or_error

        _, layers = moe_layers_or_error(model)
        for layer in layers:
            per_expert = sum(p[0].numel() for p in layer.experts.parameters())
            inactive += (layer.num_experts - layer.top_k) * per_expert
    active = total - inactive
    return {
        "total": total,
        "active_per_token": active,
        "embedding_and_lm_head": embedding,
        "total_non_embedding": total - embedding,
        "active_non_embedding": active - embedding,
    }


def lm_loss(logits: torch.Tensor, ids: torch.LongTensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def aux_loss(model, router_logits) -> torch.Tensor:
    """Switch load-balancing loss of EACH MoE layer (transformers' formula), averaged over the layers.

    transformers' ``load_balancing_loss_func`` given all layers at once concatenates them and balances
    only the union: one layer may starve an expert that another over-uses (a first recipe that did
    that left dead experts). Balanced routing gives ``top_k`` here, as with transformers' loss.
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config = model.config
    num_experts = next(
        int(getattr(config, k)) for k in ("num_local_experts", "num_experts", "n_routed_experts") if getattr(config, k, None)
    )
    top_k = int(config.num_experts_per_tok)
    losses = [load_balancing_loss_func((logits,), num_experts, top_k) for logits in router_logits]
    return torch.stack(losses).mean()


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``floor * peak`` at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, lr: float, weight_decay: float):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train(model, sampler: ChunkSampler, args, log) -> dict:
    moe = is_moe(model)
    coef = float(model.config.router_aux_loss_coef) if moe else 0.0
    opt = make_optimizer(model, args.lr, args.weight_decay)
    warmup = max(1, int(args.warmup * args.steps))
    model.train()
    history = []
    start = time.perf_counter()
    window = {"loss": 0.0, "aux": 0.0, "n": 0}
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        ids = sampler.next()
        if moe:
            out = model(input_ids=ids, use_cache=False, output_router_logits=True)
            ce = lm_loss(out.logits, ids)
            aux = aux_loss(model, out.router_logits)
            loss = ce + coef * aux
        else:
            out = model(input_ids=ids, use_cache=False)
            ce = lm_loss(out.logits, ids)
            aux = torch.zeros(())
            loss = ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        window["loss"] += ce.item()
        window["aux"] += aux.item()
        window["n"] += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            rec = {
                "step": step + 1,
                "train_ce": round(window["loss"] / window["n"], 4),
                "aux": round(window["aux"] / window["n"], 4),
                "lr": lr_at(step, args.steps, args.lr, warmup),
                "seconds": round(elapsed, 1),
            }
            history.append(rec)
            log(f"step {rec['step']:5d}  ce {rec['train_ce']:.4f}  aux {rec['aux']:.4f}  lr {rec['lr']:.2e}  "
                f"{elapsed:6.1f}s  ({(step + 1) * ids.numel() / elapsed:.0f} tok/s)")
            window = {"loss": 0.0, "aux": 0.0, "n": 0}
    return {"seconds": time.perf_counter() - start, "history": history}


# -- evaluation and the card ---------------------------------------------------------------------------


def reload(out: Path, family: str):
    """The saved checkpoint, loaded the way users (and the tests) load it."""
    if family == "dense":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
        return model, transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    from mone_export import load_model

    return load_model(str(out))


def sample(model, tokenizer, prompt: str, new_tokens: int = 48) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=False)


def evaluate_checkpoint(out: Path, family: str) -> dict:
    model, tokenizer = reload(out, family)
    result = {"settings": dict(evaluate.EVAL_SETTINGS), "perplexity": {}}
    for source in EVAL_SOURCES:
        result["perplexity"][source] = evaluate.heldout_perplexity(model, tokenizer, source)
    if family != "dense":
        batches = evaluate.eval_batches(tokenizer, SOURCE, **evaluate.EVAL_SETTINGS)
        usage = evaluate.expert_usage(model, batches)
        result["expert_usage"] = {str(k): v for k, v in usage.items()}
        result["expert_usage_summary"] = {str(k): v for k, v in evaluate.usage_summary(usage).items()}
        result["router_entropy"] = {str(k): v for k, v in evaluate.router_entropy(model, batches).items()}
        affinity = evaluate.expert_tokens(model, batches, tokenizer)
        result["token_affinity"] = {str(k): v for k, v in affinity.items()}
    result["sample"] = {"prompt": SAMPLE_PROMPT, "greedy_48_tokens": sample(model, tokenizer, SAMPLE_PROMPT)}
    return result


def folder_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def environment() -> dict:
    import tokenizers
    import transformers

    from mone_export.calibration import describe_source

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "data": describe_source(SOURCE, "train"),
    }


def write_card(out: Path, card: dict) -> None:
    (out / "card.json").write_text(json.dumps(card, indent=1, sort_keys=False) + "\n")
    (out / "CARD.md").write_text(card_markdown(card))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def card_markdown(card: dict) -> str:
    p = card["parameters"]
    ev = card["evaluation"]
    t = card["training"]
    lines = [
        f"# {card['name']}: tiny {card['model_type']} trained from scratch on Python code",
        "",
        f"A {p['total'] / 1e6:.2f} M-parameter {card['model_type']} causal LM "
        f"({p['active_per_token'] / 1e6:.2f} M active per token) for testing mone-export end to end. "
        "It has seen only the train split of the built-in `python-code` source (the Python standard library, "
        "per-file split, see `mone_export.calibration`). It is a test fixture, not a useful language model.",
        "",
        "## Reproduce",
        "",
        "```",
        card["command"],
        "```",
        "",
        f"Seed {card['seed']}, {card['environment']['threads']} CPU thread, Python {card['environment']['python']} "
        f"(its stdlib is the data), torch {card['environment']['torch']}, transformers "
        f"{card['environment']['transformers']}, tokenizers {card['environment']['tokenizers']}.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
    ]
    arch = card["architecture"]
    for key, value in arch.items():
        lines.append(f"| {key} | {value} |")
    lines += [
        f"| parameters (total) | {p['total']:,} |",
        f"| parameters active per token | {p['active_per_token']:,} |",
        f"| of which embedding + lm_head | {p['embedding_and_lm_head']:,} |",
        f"| folder size | {card['folder_bytes']:,} bytes |",
        "",
        "## Training",
        "",
        f"- tokenizer: byte-level BPE, {card['tokenizer']['vocab_size']} tokens, trained with `tokenizers` on the same "
        f"train split; `{EOS}` is bos/eos (document separator), `{PAD}` is pad",
        f"- data: {t['stream_tokens']:,} train tokens ({card['environment']['data']['num_files']} files), "
        f"non-overlapping {t['seq_len']}-token chunks in seeded random order",
        f"- {t['steps']} steps x batch {t['batch_size']} x {t['seq_len']} tokens = {t['tokens']:,} tokens "
        f"({t['epochs']:.2f} epochs)",
        f"- AdamW (0.9, 0.95), peak lr {t['lr']}, weight decay {t['weight_decay']}, warm-up {t['warmup_steps']} steps, "
        f"cosine to 10%, clip {t['clip']}",
    ]
    if t.get("router_aux_loss_coef"):
        lines.append(f"- load-balancing loss (Switch / transformers `load_balancing_loss_func`), coefficient "
                     f"{t['router_aux_loss_coef']}")
    lines += [
        f"- wall time: {t['seconds']:.0f} s training, {card['wall_seconds_total']:.0f} s in all",
        f"- final train cross-entropy {t['history'][-1]['train_ce']:.3f} (mean of the last {card['log_every']} steps)",
        "",
        "## Held-out perplexity",
        "",
        f"{ev['settings']['num_samples']} chunks x {ev['settings']['seq_len']} tokens per source "
        f"(`calibration_batches(src, tok, {ev['settings']['num_samples']}, {ev['settings']['seq_len']}, "
        f"seed={ev['settings']['seed']}, split=\"heldout\")`), computed by `mone_export/evaluate.py`:",
        "",
        "| source | perplexity | mean NLL (nats) | tokens scored |",
        "|---|---|---|---|",
    ]
    for source, r in ev["perplexity"].items():
        lines.append(f"| {source} (heldout) | {r['ppl']:.3f} | {r['nll']:.4f} | {r['tokens']:,} |")
    if "expert_usage" in ev:
        num_e = len(next(iter(ev["expert_usage"].values())))
        lines += [
            "",
            "## Expert usage (held-out python-code)",
            "",
            f"Share of routing slots per expert, in % (balanced = {100 / num_e:.1f}%); router entropy is the mean "
            "per-token entropy of the router softmax / log E (1 = no preference); token purity is how often a token "
            "goes to its usual top-1 expert (baseline: the largest top-1 share).",
            "",
            "| layer | " + " | ".join(f"e{e}" for e in range(num_e)) + " | max/min | router entropy | token purity (baseline) |",
            "|---|" + "---|" * num_e + "---|---|---|",
        ]
        for layer, shares in ev["expert_usage"].items():
            s = ev["expert_usage_summary"][layer]
            aff = ev["token_affinity"][layer]
            lines.append(
                f"| {layer} | " + " | ".join(_pct(x) for x in shares)
                + f" | {s['max_over_min']:.2f} | {ev['router_entropy'][layer]:.3f} | "
                f"{aff['token_purity']:.2f} ({aff['baseline']:.2f}) |"
            )
        last = list(ev["token_affinity"])[-1]
        lines += ["", f"Tokens with the highest lift per expert, layer {last}:", ""]
        for e, toks in ev["token_affinity"][last]["top_tokens"].items():
            lines.append(f"- e{e}: " + ", ".join(f"`{json.dumps(x)[1:-1]}`" for x in toks))
    if card.get("dense_baseline"):
        lines += ["", "## Dense baseline", "", card["dense_baseline"]]
    lines += [
        "",
        "## Sample (greedy)",
        "",
        "```python",
        ev["sample"]["greedy_48_tokens"],
        "```",
        "",
    ]
    return "\n".join(lines)


def architecture(config) -> dict:
    keys = [
        "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
        "num_local_experts", "num_experts", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
        "first_k_dense_replace", "topk_method", "norm_topk_prob", "kv_lora_rank", "q_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "router_aux_loss_coef",
    ]
    d = config.to_dict()
    return {k: d[k] for k in keys if d.get(k) is not None}


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: per family, see DEFAULT_STEPS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up as a fraction of the steps")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--preset", default="bundled", choices=sorted(PRESETS),
                        help="sizes: bundled (the bundled models) or large (~21M parameters, benchmarks only)")
    args = parser.parse_args(argv)
    if args.preset != "bundled" and args.family not in PRESETS[args.preset]["families"]:
        parser.error(f"--preset {args.preset} has sizes for {', '.join(sorted(PRESETS[args.preset]['families']))}, "
                     f"not {args.family}")
    if args.steps is None:
        args.steps = PRESETS[args.preset]["steps"].get(args.family, DEFAULT_STEPS[args.family])
    return args


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # tokenizers' trainer
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[{args.family} {time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    tokenizer = train_tokenizer(args.vocab_size)
    log(f"tokenizer: {len(tokenizer)} tokens")
    stream = train_stream(tokenizer)
    log(f"train stream: {len(stream):,} tokens")
    sampler = ChunkSampler(stream, args.seq_len, args.batch_size, args.seed)
    config = build_config(args.family, tokenizer, args.preset)
    model = build_model(config, args.seed)
    params = parameter_counts(model)
    log(f"parameters: {params}")
    result = train(model, sampler, args, log)

    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (out / name).unlink(missing_ok=True)
    model.eval()
    model.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
    for file in out.iterdir():
        if file.is_file():
            file.chmod(0o644)  # safetensors writes through a private (0600) temporary file
    log("saved; evaluating")
    evaluation = evaluate_checkpoint(out, args.family)
    for source, r in evaluation["perplexity"].items():
        log(f"heldout ppl {source}: {r['ppl']:.3f}")

    command = "python models/train.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    card = {
        "name": out.name,
        "family": args.family,
        "model_type": config.model_type,
        "command": command,
        "seed": args.seed,
        "preset": args.preset,
        "architecture": architecture(config),
        "parameters": params,
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer), "bos": EOS, "eos": EOS,
                      "pad": PAD, "trained_on": f"{SOURCE}, split train"},
        "training": {
            "source": SOURCE,
            "split": "train",
            "stream_tokens": int(len(stream)),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "tokens": args.steps * args.batch_size * args.seq_len,
            "epochs": args.steps * args.batch_size / len(sampler.chunks),
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "warmup_steps": max(1, int(args.warmup * args.steps)),
            "clip": args.clip,
            "router_aux_loss_coef": getattr(config, "router_aux_loss_coef", None) if args.family != "dense" else None,
            "optimizer": "AdamW(betas=(0.9, 0.95), eps=1e-8), weight decay on >=2-D parameters only",
            "schedule": "linear warm-up, cosine decay to 10% of peak",
            "seconds": result["seconds"],
            "history": result["history"],
        },
        "log_every": args.log_every,
        "evaluation": evaluation,
        "environment": environment(),
        "weights_sha256": sha256(out / "model.safetensors"),
    }
    card["wall_seconds_total"] = time.perf_counter() - started
    card["folder_bytes"] = 0
    write_card(out, card)
    # The card counts itself: write it once more with the final folder size (stable after one rewrite).
    for _ in range(3):
        size = folder_bytes(out)
        if size == card["folder_bytes"]:
            break
        card["folder_bytes"] = size
        write_card(out, card)
    log(f"done: {card['folder_bytes']:,} bytes in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

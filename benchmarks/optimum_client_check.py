"""Load mone-export output folders with Optimum's ORTModelForCausalLM and print their greedy tokens as JSON.

Run it with a Python that has ``optimum-onnx`` and ``transformers<4.58`` (a separate virtual environment: Optimum-ONNX
0.1 does not support transformers 5)::

    python -m venv /tmp/optimum-venv
    /tmp/optimum-venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    /tmp/optimum-venv/bin/pip install 'optimum-onnx[onnxruntime]==0.1.0' 'transformers==4.57.6'
    /tmp/optimum-venv/bin/python benchmarks/optimum_client_check.py out/ other_out/ --prompt "def main(" --new-tokens 16

For every folder it prints what transformers 4.x read from ``config.json`` (the values Optimum and a 4.x model would
use), the tokenizer class and prompt ids, and the greedy tokens of ``ORTModelForCausalLM.generate``; it exits 1 when a
generation fails. ``tests/test_clients.py`` (with ``MONE_OPTIMUM_PYTHON`` set to that Python) compares them with
transformers 5 and onnxruntime-genai on the same folders.

Optimum-ONNX 0.1 takes the number of KV heads from ``config.json`` only for the model types it lists
(``optimum/onnxruntime/modeling_decoder.py``, ``ORTModelForCausalLM.__init__``), and the head size from ``head_dim``
only for gemma / gpt_oss / nemotron: otherwise it assumes ``num_attention_heads`` KV heads of
``hidden_size // num_attention_heads``, which is wrong for grouped-query attention (mixtral, qwen2_moe, olmoe), for a
``head_dim`` of its own (Qwen3-MoE) and for DeepSeek-V2's packed MLA cache. It uses them for the empty cache of the
first step (and the output shapes under IO binding); ONNX Runtime then rejects the cache
(``past_key_values.0.key ... index: 1 Got: 4 Expected: 2``). :func:`use_graph_cache_shape` sets both from the shape the
graph declares for ``past_key_values.0.key`` (``--optimum-defaults`` skips it, to show the failure).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

DEFAULT_PROMPTS = ["def fibonacci(n):\n    ", "import os\n\nclass ", "The results of the"]
# What a 4.x config class reads and a decoder's behaviour depends on (missing ones are reported as None).
CONFIG_KEYS = ["model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "num_hidden_layers", "vocab_size", "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings",
               "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]
PAST_KEY = "past_key_values.0.key"


def use_graph_cache_shape(model) -> tuple[int, int]:
    """Make Optimum allocate the empty first-step cache with the graph's KV heads and head size; returns them.

    The graph declares ``past_key_values.{i}.key`` as ``[batch, kv_heads, past, head_size]`` with static heads and
    size; Optimum reads its ``num_key_value_heads`` / ``embed_size_per_head`` attributes for the first step's empty
    past (and for IO binding), so setting them is all it needs.
    """
    inputs = {i.name: i.shape for i in model.session.get_inputs()}
    shape = inputs[PAST_KEY]
    heads, head_size = int(shape[1]), int(shape[3])
    value = inputs[PAST_KEY.replace(".key", ".value")]
    if (int(value[1]), int(value[3])) != (heads, head_size):  # Optimum has one shape for keys and values
        raise ValueError(f"{PAST_KEY} is {shape} but its value is {value}: Optimum cannot allocate both")
    model.num_key_value_heads = heads
    model.embed_size_per_head = head_size
    return heads, head_size


def config_values(config) -> dict:
    """The :data:`CONFIG_KEYS` values ``config`` holds, JSON-friendly."""
    values = {}
    for key in CONFIG_KEYS:
        value = getattr(config, key, None)
        values[key] = dict(value) if isinstance(value, dict) else value
    return values


def check_folder(folder: str, prompts: list[str], new_tokens: int, fix_cache_shape: bool) -> dict:
    """Load ``folder`` with Optimum and transformers 4.x and generate greedily from every prompt."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = ORTModelForCausalLM.from_pretrained(folder)
    result = {"config": config_values(model.config), "tokenizer_class": type(tokenizer).__name__,
              "optimum_cache_shape": [model.num_key_value_heads, model.embed_size_per_head]}
    if fix_cache_shape:
        result["graph_cache_shape"] = list(use_graph_cache_shape(model))
    result["prompts"] = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        row = {"prompt": prompt, "input_names": sorted(inputs), "input_ids": inputs["input_ids"][0].tolist()}
        try:
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
            row["generated"] = output[0, inputs["input_ids"].shape[1]:].tolist()
        except Exception as error:  # reported per prompt: the caller sees which folder and prompt fail, and why
            row["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc(file=sys.stderr)
        result["prompts"].append(row)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="mone-export output folders (model.onnx, config.json, tokenizer)")
    parser.add_argument("--prompt", action="append", dest="prompts", help="a prompt (repeatable; default: 3 fixed ones)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--optimum-defaults", action="store_true",
                        help="keep Optimum's own KV-cache shape (no use_graph_cache_shape)")
    args = parser.parse_args(argv)

    import optimum.onnxruntime  # noqa: F401  (fail here, before any folder, when optimum-onnx is missing)
    import transformers
    from importlib.metadata import version

    report = {"versions": {name: version(name) for name in ("optimum-onnx", "optimum", "transformers", "onnxruntime",
                                                            "torch")},
              "folders": {}}
    transformers.logging.set_verbosity_error()
    for folder in args.folders:
        report["folders"][folder] = check_folder(folder, args.prompts or DEFAULT_PROMPTS, args.new_tokens,
                                                 fix_cache_shape=not args.optimum_defaults)
    print(json.dumps(report, indent=1))
    failed = any("error" in row for folder in report["folders"].values() for row in folder["prompts"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

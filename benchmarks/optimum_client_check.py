"""Optimum's ORTModelForCausalLM (transformers 4.57) on mone-export output folders, against onnxruntime-genai.

Optimum-ONNX 0.1 needs ``transformers<4.58``, so two Pythons take part: this project's venv (transformers 5,
onnxruntime-genai) and a second venv with Optimum::

    python3 -m venv /tmp/optimum-venv
    /tmp/optimum-venv/bin/pip install torch==2.13.0          # the CPU wheel first (as in the README)
    /tmp/optimum-venv/bin/pip install 'optimum-onnx>=0.1,<0.2' 'transformers<4.58' onnxruntime==1.32.0

    # this venv: export the bundled models (mone-export, with its parity check), run both clients, compare
    # (about 4 min on 2 busy cores, nearly all of it the exports; 10-15 s with --folders)
    python benchmarks/optimum_client_check.py compare --optimum-python /tmp/optimum-venv/bin/python \\
        --models mixtral qwen2_moe olmoe deepseek_v2 --dir /tmp/clients \\
        --json benchmarks/results/optimum_client_check.json
    # or on folders already written by mone-export:
    python benchmarks/optimum_client_check.py compare --optimum-python /tmp/optimum-venv/bin/python \\
        --folders out/ other_out/

    # the Optimum half alone (prints its JSON):
    /tmp/optimum-venv/bin/python benchmarks/optimum_client_check.py optimum out/ --new-tokens 16

``compare`` writes per model: greedy tokens of ``ORTModelForCausalLM.generate`` and of onnxruntime-genai for every
prompt (equal?, first differing position), the same with Optimum's IO binding, whether transformers 4.57 reads the
same ``config.json`` values and tokenizer ids as transformers 5, what Optimum does without the workaround below, and
timings (session load; median over prompts of a ``generate`` call's milliseconds per new token, prompt included, after
a warm-up call: on these tiny models mostly per-step Python overhead); it prints a summary and exits 1 on any
disagreement. ``tests/test_clients.py`` runs it (with
``MONE_OPTIMUM_PYTHON`` set to the Optimum venv's Python) and checks the tokens itself.

The known gap, and its workaround. Optimum-ONNX 0.1 (and its main branch) takes the number of KV heads from
``config.json`` only for the model types it lists (``optimum/onnxruntime/modeling_decoder.py``,
``ORTModelForCausalLM.__init__``), and the head size from ``head_dim`` only for gemma / gpt_oss / nemotron: otherwise
it assumes ``num_attention_heads`` KV heads of ``hidden_size // num_attention_heads``. That is wrong for grouped-query
attention (mixtral, qwen2_moe, olmoe), a ``head_dim`` of its own (qwen3_moe) and DeepSeek-V2's packed MLA cache. It
allocates the empty cache of the first call with them (and the output buffers under IO binding), and ONNX Runtime
rejects it: ``past_key_values.0.key ... index: 1 Got: 4 Expected: 2``. Nothing in the folder can change that: the
choice depends on ``model_type`` alone (which must stay the model's for transformers), no NormalizedConfig or other
config key is consulted, and the graph's declared cache shape is read only for old Bloom graphs. So after loading,
set both from the graph's declared cache shape (:func:`use_graph_cache_shape`; the README's example)::

    model = ORTModelForCausalLM.from_pretrained("out")
    shape = {i.name: i.shape for i in model.session.get_inputs()}["past_key_values.0.key"]  # [batch, heads, past, size]
    model.num_key_value_heads, model.embed_size_per_head = shape[1], shape[3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

DEFAULT_PROMPTS = ["def fibonacci(n):\n    ", "import os\n\nclass ", "The results of the"]
# Tokenizer samples: code, non-ASCII and control characters, a special token inside text, nothing.
DEFAULT_TEXTS = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "  émigré\t<|pad|>tabs\n\n",
                 "<|endoftext|>x<|endoftext|>", ""]
DEFAULT_NEW_TOKENS = 16
PAST_KEY = "past_key_values.0.key"
# Settings that mean the same in both readers although their to_dict() values differ.
SAME_MEANING = {
    # written by each reader: not a setting
    "transformers_version": lambda c4, c5: True,
    # sliding window off: 4.57's Qwen2-MoE stores None, 5.x stores 0
    "sliding_window": lambda c4, c5: not c4.get("use_sliding_window") and not c5.get("use_sliding_window"),
}


def use_graph_cache_shape(model) -> tuple[int, int]:
    """Make Optimum allocate the empty first-step cache with the graph's KV heads and head size; returns them.

    The graph declares ``past_key_values.{i}.key|value`` as ``[batch, kv_heads, past, head_size]`` with static heads
    and size; Optimum reads its ``num_key_value_heads`` / ``embed_size_per_head`` attributes for the first call's empty
    past and for the output buffers under IO binding, so setting them is all it needs.
    """
    inputs = {i.name: i.shape for i in model.session.get_inputs()}
    shape = inputs[PAST_KEY]
    model.num_key_value_heads, model.embed_size_per_head = shape[1], shape[3]  # the README's two lines, plus a check
    value = inputs[PAST_KEY.replace(".key", ".value")]
    if (value[1], value[3]) != (shape[1], shape[3]):  # Optimum has one shape for keys and values
        raise ValueError(f"{PAST_KEY} is {shape} but its value is {value}: Optimum cannot allocate both")
    return int(shape[1]), int(shape[3])


def tokenizer_view(tokenizer, texts: list[str]) -> dict:
    """What a tokenizer does with text: class, vocabulary size, special tokens, ids and decoding."""
    return {
        "class": type(tokenizer).__name__,
        "len": len(tokenizer),
        "special": {key: getattr(tokenizer, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                             "unk_token_id")},
        "all_special_tokens": list(tokenizer.all_special_tokens),
        "max_length": tokenizer.model_max_length,
        "encoded": [dict(tokenizer(text)) for text in texts],
        "decoded": [tokenizer.decode(tokenizer(text)["input_ids"]) for text in texts],
    }


def first_difference(a: list, b: list) -> int | None:
    """The first position where the sequences differ (a length difference counts), or None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def config_differences(config_4x: dict, config_5x: dict, written: dict) -> dict:
    """``{key: [4.x value, 5.x value]}`` for every setting the two readers' ``to_dict()`` disagree on.

    4.x spells RoPE as ``rope_theta`` (+ ``rope_scaling``), 5.x as ``rope_parameters``: those must hold the same.
    Keys only 4.x has are its own defaults for settings 5.x dropped (generation defaults, training-only losses); they
    count as differences only when ``config.json`` sets them (5.x then lost them).
    """
    differences = {}
    for key in sorted(config_4x.keys() | config_5x.keys()):
        if key in ("rope_theta", "rope_scaling"):
            continue
        if key in config_4x and key in config_5x:
            if config_4x[key] != config_5x[key] and not SAME_MEANING.get(key, lambda *_: False)(config_4x, config_5x):
                differences[key] = [config_4x[key], config_5x[key]]
        elif key in config_5x or key in written:
            differences[key] = [config_4x.get(key), config_5x.get(key)]
    rope_5x = config_5x.get("rope_parameters")
    if isinstance(rope_5x, dict) and "rope_theta" in rope_5x:
        rope_4x = {"rope_type": "default", **(config_4x.get("rope_scaling") or {}),
                   "rope_theta": config_4x.get("rope_theta")}
        if rope_4x != rope_5x:
            differences["rope_theta / rope_scaling"] = [rope_4x, rope_5x]
    return differences


# --- the Optimum half (runs in the Optimum venv) ----------------------------------------------------------------------


def _optimum_generate(model, tokenizer, prompt: str, new_tokens: int) -> dict:
    import torch

    inputs = tokenizer(prompt, return_tensors="pt")
    row = {"prompt": prompt, "input_names": sorted(inputs), "input_ids": inputs["input_ids"][0].tolist()}
    start = time.perf_counter()
    try:
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        row["generated"] = output[0, inputs["input_ids"].shape[1]:].tolist()
    except Exception as error:  # reported per prompt: the caller sees which folder and prompt fail, and why
        row["error"] = f"{type(error).__name__}: {error}"
    row["seconds"] = time.perf_counter() - start
    return row


def optimum_folder(folder: str, prompts: list[str], texts: list[str], new_tokens: int) -> dict:
    """Load ``folder`` with Optimum and transformers 4.x; generate greedily as Optimum is, then with the workaround."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(folder)
    start = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(folder)
    result = {"load_seconds": time.perf_counter() - start,
              "config": AutoConfig.from_pretrained(folder).to_dict(),
              "generation_config": GenerationConfig.from_pretrained(folder).to_dict(),
              "tokenizer": tokenizer_view(tokenizer, texts),
              "optimum_cache_shape": [model.num_key_value_heads, model.embed_size_per_head]}
    result["as_is"] = _optimum_generate(model, tokenizer, prompts[0], new_tokens)  # Optimum's own cache shape
    result["graph_cache_shape"] = list(use_graph_cache_shape(model))
    _optimum_generate(model, tokenizer, prompts[0], new_tokens)  # warm-up, untimed
    result["prompts"] = [_optimum_generate(model, tokenizer, prompt, new_tokens) for prompt in prompts]
    model.use_io_binding = True  # the path CUDA takes by default: output buffers sized from the same attributes
    result["io_binding"] = [_optimum_generate(model, tokenizer, prompt, new_tokens) for prompt in prompts]
    return result


def run_optimum(folders: list[str], prompts: list[str], texts: list[str], new_tokens: int) -> dict:
    import transformers
    from importlib.metadata import version

    transformers.logging.set_verbosity_error()
    return {"versions": {name: version(name) for name in ("optimum-onnx", "optimum", "transformers", "onnxruntime",
                                                          "torch")},
            "prompts": prompts, "texts": texts, "new_tokens": new_tokens,
            "folders": {folder: _optimum_folder_or_error(folder, prompts, texts, new_tokens) for folder in folders}}


def _optimum_folder_or_error(folder: str, *args) -> dict:
    try:
        return optimum_folder(folder, *args)
    except Exception as error:  # e.g. a tokenizer_config.json 4.x cannot read: the other folders still run
        traceback.print_exc(file=sys.stderr)
        return {"error": f"{type(error).__name__}: {error}"}


# --- the comparison (runs in this project's venv) ---------------------------------------------------------------------


def genai_generate(model, tokenizer, prompt: str, new_tokens: int) -> tuple[list[int], list[int]]:
    """One greedy onnxruntime-genai generation: the prompt's ids and the new tokens."""
    import onnxruntime_genai as og

    ids = [int(t) for t in tokenizer.encode(prompt)]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return ids, [int(t) for t in generator.get_sequence(0)[len(ids):]]


def genai_greedy(folder: str | Path, prompts: list[str], new_tokens: int) -> dict:
    """onnxruntime-genai's prompt ids and greedy tokens per prompt, with load and generation times."""
    import onnxruntime_genai as og

    start = time.perf_counter()
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    result = {"load_seconds": time.perf_counter() - start, "prompts": []}
    for prompt in [prompts[0], *prompts]:  # the first run is a warm-up, dropped below
        start = time.perf_counter()
        ids, generated = genai_generate(model, tokenizer, prompt, new_tokens)
        result["prompts"].append({"input_ids": ids, "generated": generated, "seconds": time.perf_counter() - start})
    result["prompts"] = result["prompts"][1:]
    return result


def _as_json(value):
    """``value`` as it comes back through JSON (e.g. ``id2label``'s int keys become strings)."""
    return json.loads(json.dumps(value, default=str))


def _error_line(error: str) -> str:
    """An ONNX Runtime error in one line, without its boilerplate."""
    text = " ".join(error.split())
    text = text.split("INVALID_ARGUMENT : ", 1)[-1]
    return text.split(" Please fix", 1)[0]


def _ms_per_token(rows: list[dict]) -> float | None:
    """Median over prompts of a generate call's time per new token (prompt included), after a warm-up call."""
    import statistics

    values = [1000 * row["seconds"] / len(row["generated"]) for row in rows if row.get("generated")]
    return statistics.median(values) if values else None


def compare_folder(folder: str, seen: dict, prompts: list[str], texts: list[str], new_tokens: int) -> dict:
    """One folder's verdicts: Optimum's (``seen``) tokens, config and tokenizer against genai's and transformers 5's."""
    import transformers

    if "error" in seen:
        return {"folder": folder, "tokens_equal": False, "error": seen["error"], "prompts": [],
                "config_differences": {}, "tokenizer_equal": False}
    genai = genai_greedy(folder, prompts, new_tokens)
    rows = []
    for prompt, optimum, io_bound, reference in zip(prompts, seen["prompts"], seen["io_binding"], genai["prompts"]):
        tokens = optimum.get("generated")
        rows.append({"prompt": prompt, "optimum": tokens, "genai": reference["generated"],
                     "equal": tokens == reference["generated"],
                     "first_difference": None if tokens is None else first_difference(tokens, reference["generated"]),
                     "io_binding_equal": io_bound.get("generated") == reference["generated"],
                     "input_ids_equal": optimum["input_ids"] == reference["input_ids"],
                     "error": optimum.get("error") or io_bound.get("error")})
    config_5x = _as_json(transformers.AutoConfig.from_pretrained(folder).to_dict())  # as the 4.x half's came
    written = json.loads((Path(folder) / "config.json").read_text())
    view_5x = tokenizer_view(transformers.AutoTokenizer.from_pretrained(folder), texts)
    view_4x = seen["tokenizer"]
    return {
        "folder": folder,
        "model_type": written.get("model_type"),
        "tokens_equal": all(row["equal"] and row["io_binding_equal"] for row in rows),
        "prompts": rows,
        "config_differences": config_differences(seen["config"], config_5x, written),
        "tokenizer_equal": {k: v for k, v in view_4x.items() if k != "class"} ==
                           {k: v for k, v in view_5x.items() if k != "class"},
        "tokenizer_class": {"transformers_4": view_4x["class"], "transformers_5": view_5x["class"]},
        "cache_shape": {"optimum_guess": seen["optimum_cache_shape"], "graph": seen["graph_cache_shape"]},
        "optimum_as_is": _error_line(seen["as_is"]["error"]) if "error" in seen["as_is"] else "ok",
        "timings": {"optimum_load_s": seen["load_seconds"], "genai_load_s": genai["load_seconds"],
                    "optimum_ms_per_token": _ms_per_token(seen["prompts"]),
                    "optimum_io_binding_ms_per_token": _ms_per_token(seen["io_binding"]),
                    "genai_ms_per_token": _ms_per_token(genai["prompts"])},
    }


def export_bundled(name: str, out: Path, ratio: float) -> float:
    """``mone-export --model NAME --ratio R --calib-samples 8 --seq-len 64 -o OUT``; returns its seconds."""
    command = [sys.executable, "-m", "mone_export.cli", "--model", name, "--ratio", str(ratio), "--method", "mone",
               "--calib-samples", "8",
               "--seq-len", "64", "-o", str(out), "--overwrite", "--quiet"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def run_compare(args) -> dict:
    from importlib.metadata import version

    folders, export_seconds = {}, {}
    for name in args.models or []:
        folders[name] = str(Path(args.dir) / name)
        export_seconds[name] = export_bundled(name, Path(folders[name]), args.ratio)
    for folder in args.folders or []:
        folders[folder] = folder
    if not folders:
        raise SystemExit("nothing to check: give --models and/or --folders")

    command = [args.optimum_python, str(Path(__file__).resolve()), "optimum", *folders.values(),
               "--new-tokens", str(args.new_tokens)]
    for prompt in args.prompts:
        command += ["--prompt", prompt]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    optimum_seconds = time.perf_counter() - start
    if run.returncode != 0:
        sys.stderr.write(run.stderr)
        raise SystemExit(f"the Optimum half failed (exit {run.returncode}): {' '.join(command)}")
    seen = json.loads(run.stdout)
    if args.optimum_json:  # the Optimum half's own JSON (configs and tokenizer views as transformers 4.x read them)
        Path(args.optimum_json).write_text(run.stdout)

    models = {}
    for name, folder in folders.items():
        models[name] = {**compare_folder(folder, seen["folders"][folder], args.prompts, seen["texts"], args.new_tokens),
                        "export_seconds": export_seconds.get(name)}
    return {
        "versions": {"main": {name: version(name) for name in ("transformers", "onnxruntime", "onnxruntime-genai",
                                                               "torch")},
                     "optimum": seen["versions"]},
        "settings": {"prompts": args.prompts, "new_tokens": args.new_tokens, "texts": seen["texts"],
                     "ratio": args.ratio if args.models else None},
        "optimum_half_seconds": optimum_seconds,
        "models": models,
    }


def passed(report: dict) -> bool:
    return all(m["tokens_equal"] and not m["config_differences"] and m["tokenizer_equal"]
               for m in report["models"].values())


def summary(report: dict) -> str:
    def ms(value):
        return "-" if value is None else f"{value:.2f}"

    optimum, main = report["versions"]["optimum"], report["versions"]["main"]
    lines = [f"Optimum {optimum['optimum-onnx']} (transformers {optimum['transformers']}) vs onnxruntime-genai "
             f"{main['onnxruntime-genai']} (transformers {main['transformers']}), {report['settings']['new_tokens']} "
             f"greedy tokens from {len(report['settings']['prompts'])} prompts",
             "| model | tokens equal | first difference | config | tokenizer | Optimum as is | Optimum ms/token | "
             "genai ms/token |", "| --- | --- | --- | --- | --- | --- | ---: | ---: |"]
    for name, m in report["models"].items():
        if "error" in m:
            lines.append(f"| {Path(name).name} | Optimum cannot load it: {m['error'][:200]} | | | | | | |")
            continue
        equal = sum(row["equal"] and row["io_binding_equal"] for row in m["prompts"])
        first = [row["first_difference"] for row in m["prompts"] if row["first_difference"] is not None]
        as_is = "ok" if m["optimum_as_is"] == "ok" else "fails: " + m["optimum_as_is"]
        lines.append(f"| {Path(name).name} | {equal}/{len(m['prompts'])} | {first[0] if first else '-'} | "
                     f"{'same' if not m['config_differences'] else m['config_differences']} | "
                     f"{'same ids' if m['tokenizer_equal'] else 'DIFFERENT'} | {as_is} | "
                     f"{ms(m['timings']['optimum_ms_per_token'])} | {ms(m['timings']['genai_ms_per_token'])} |")
    lines.append("passed" if passed(report) else "FAILED: see the JSON")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prompt", action="append", dest="prompts",
                        help="a prompt (repeatable; default: 3 fixed ones)")
    common.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)

    compare = commands.add_parser("compare", parents=[common], help="this venv: Optimum's tokens against genai's")
    compare.add_argument("--optimum-python", required=True,
                         help="a Python with optimum-onnx and transformers<4.58 (the Optimum venv's bin/python)")
    compare.add_argument("--models", nargs="+", help="bundled or local models to export with mone-export first")
    compare.add_argument("--dir", default="/tmp/optimum-client-check", help="where --models are exported")
    compare.add_argument("--ratio", type=float, default=0.5, help="MoNE ratio of the --models exports")
    compare.add_argument("--folders", nargs="+", help="existing mone-export output folders")
    compare.add_argument("--json", help="write the report here")
    compare.add_argument("--optimum-json", help="write the Optimum half's JSON here")

    optimum = commands.add_parser("optimum", parents=[common],
                                  help="the Optimum venv: load folders with ORTModelForCausalLM, print JSON")
    optimum.add_argument("folders", nargs="+", help="mone-export output folders (model.onnx, config.json, tokenizer)")
    optimum.add_argument("--text", action="append", dest="texts", help="a tokenizer sample (repeatable)")
    args = parser.parse_args(argv)
    args.prompts = args.prompts or DEFAULT_PROMPTS

    if args.command == "optimum":
        import optimum.onnxruntime  # noqa: F401  (fail here, before any folder, when optimum-onnx is missing)

        print(json.dumps(run_optimum(args.folders, args.prompts, args.texts or DEFAULT_TEXTS, args.new_tokens),
                         indent=1))
        return 0
    report = run_compare(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    return 0 if passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The PyTorch side of a validation: one cached forward step and greedy generation of the reference model."""

from __future__ import annotations

import torch

__all__ = ["eos_ids", "greedy_torch", "torch_step"]


def torch_step(model, input_ids, attention_mask, position_ids, cache):
    """One forward of the PyTorch model through its own cache: ``(logits, cache)``."""
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask),
                    position_ids=torch.as_tensor(position_ids), cache=cache, use_cache=True,
                    return_dict=True)
    return out.logits, out.cache


def eos_ids(model) -> set[int]:
    """The model's end-of-sequence token ids (its generation config's, else its config's)."""
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def greedy_torch(model, prompt: torch.Tensor, new_tokens: int, eos: set[int]) -> tuple[list[int], list[torch.Tensor]]:
    """``model.generate(do_sample=False)``: the new tokens and the raw logits of each step."""
    from transformers import GenerationConfig

    vocab = int(model.config.vocab_size)
    eos_list = sorted(e for e in eos if 0 <= e < vocab) or None
    pad = eos_list[0] if eos_list else 0
    # Explicit values: generate() fills unset fields from the model's own generation config.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=0,
                              repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos_list,
                              pad_token_id=pad, use_cache=True, output_logits=True, return_dict_in_generate=True)
    ids = prompt.reshape(1, -1)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return [int(t) for t in out.sequences[0, ids.shape[1]:]], [step[0] for step in out.logits]

"""Plumbing for 03's generation loop (the loop itself is in the notebook; the sampler in helpers.decoding): waves
of prompt rows, each answer's seed, what a resumed run still lacks, the merged adapter, fast decode attention,
and how many answers fit in memory at once.

Exact resume: the waves depend on the full prompt grid and the wave size only, each answer's seed on its row's
key, and a partly stored wave is answered again whole (only its missing rows appended), so a resumed run writes
byte for byte what an uninterrupted one writes on the same device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from helpers.seeds import stable_seed
from helpers.store import JsonlStore

# Every completion row is keyed by these fields: one answer per model and prompt row.
COMPLETION_KEY = ("model", "question_id", "format", "sample_index")
# The fields of a prompt row that name it: each answer's seed derives from them.
PROMPT_KEY = COMPLETION_KEY[1:]
WAVE_BATCHES = 8  # a wave holds this many batches' worth of rows: one tail of long answers each, one unit of resume


def prompt_waves(rows: Sequence[dict], lengths: Sequence[int], wave_size: int, formats: Sequence[str]) -> list[list[dict]]:
    """The rows in waves of at most `wave_size`, which helpers.decoding answers one after the other: by format in
    `formats` order (the paper's answers to the original questions run long, the word lists are short, so answers
    that end late start together), then longest prompt first (a memory error comes early). Ties keep grid order:
    the same grid and wave size always give the same waves, whatever a run has stored already."""
    if wave_size < 1 or len(lengths) != len(rows):
        raise ValueError(f"prompt_waves: wave_size {wave_size} (want >= 1), {len(lengths)} lengths for {len(rows)} rows")
    order = sorted(range(len(rows)), key=lambda index: (formats.index(rows[index]["format"]), -lengths[index], index))
    return [[rows[index] for index in order[start:start + wave_size]] for start in range(0, len(order), wave_size)]


def answer_seed(seed: int, row: dict) -> int:
    """The sampling seed of one prompt row's answer, from its key (not the model, nor its batch): every model
    draws the same random numbers for the same row, so their answers differ only by the model, whatever rows
    share its batch (vLLM takes the same seed per request)."""
    return stable_seed(seed, "answer", *(row[field] for field in PROMPT_KEY))


def pending_waves(store: JsonlStore, model_name: str, waves: Sequence[list[dict]]) -> list[list[dict]]:
    """The waves with a row that `model_name` has not answered in `store` yet. A partly stored wave (a run killed
    in it) comes back whole: answered again in the same order, with the same dice, only its missing rows are new."""
    return [rows for rows in waves if any((model_name, *(row[f] for f in PROMPT_KEY)) not in store for row in rows)]


@contextmanager
def merged_adapter(model: Any, name: str) -> Iterator[None]:
    """Fold adapter `name` into the weights while it generates (no LoRA matmuls per token). The original
    weights are copied aside first and put back after, so the base model stays exact."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
    saved = [layer.get_base_layer().weight.detach().to("cpu", copy=True) for layer in layers]
    model.merge_adapter(adapter_names=[name])
    try:
        yield
    finally:
        model.unmerge_adapter()
        for layer, weight in zip(layers, saved, strict=True):
            layer.get_base_layer().weight.data.copy_(weight)


GQA_DECODE_ATTENTION = "sdpa_gqa_decode"  # the name transformers knows gqa_decode_attention by


def gqa_decode_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                         scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' SDPA attention, except at a decoding step (one new token) with grouped-query attention.
    There transformers copies the KV cache once per query head whenever a padding mask is present; here the
    query heads sharing a KV head become its query rows, so one SDPA call reads each cached key once."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, new_tokens, head_dim = query.shape
    if new_tokens != 1 or groups == 1 or kwargs.get("output_attentions") or kwargs.get("dropout"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    rows = query.reshape(batch, heads // groups, groups, head_dim)
    output = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return output.reshape(batch, heads, 1, head_dim).transpose(1, 2).contiguous(), None


def use_gqa_decode_attention(model: Any) -> None:
    """Switch a transformers model (or a PeftModel around one) to `gqa_decode_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(GQA_DECODE_ATTENTION, gqa_decode_attention)
    AttentionMaskInterface.register(GQA_DECODE_ATTENTION, padding_mask_always)
    model.set_attn_implementation(GQA_DECODE_ATTENTION)


def padding_mask_always(*args: Any, **kwargs: Any) -> Any:
    """transformers' SDPA mask, built even when it is all ones: transformers would first check for that and pass no
    mask, and the check makes the host wait for the GPU at every forward pass (it overrides any default)."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


def sequences_that_fit(memory_bytes: int, model_config: Any, dtype_bytes: int, max_tokens: int, share: float = 0.7) -> int:
    """How many sequences of `max_tokens` fit in `share` of `memory_bytes`: each holds its KV cache (2 x layers x
    KV heads x head dim x tokens) and, while helpers.decoding regroups the rows one layer at a time, two more
    copies of one layer's; and 12 bytes per vocabulary entry for the last position's logits. The rest of the
    memory holds the cache's spare room (SLACK tokens) and the draw's float64 copies: ~1/8 more at 600 tokens."""
    text = model_config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    layer = 2 * kv_heads * head_dim * dtype_bytes * max_tokens
    per_sequence = layer * (text.num_hidden_layers + 2) + 3 * 4 * text.vocab_size
    return int(share * memory_bytes // per_sequence)


def fitting_batch_size(model: Any, requested: int, max_tokens: int) -> int:
    """`requested`, lowered on a GPU to what it holds besides the weights (a 15 GB T4 takes far fewer than an
    H100). From the card's total memory, never its free memory: a resume gets the same batches."""
    if not torch.cuda.is_available():
        return requested
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    spare = torch.cuda.get_device_properties(0).total_memory - weights
    fitting = max(1, sequences_that_fit(spare, model.config, next(model.parameters()).element_size(), max_tokens))
    if fitting < requested:
        print(f"batch size {requested} lowered to {fitting}: {spare / 2**30:.1f} GiB beside the weights, "
              f"{max_tokens} tokens a sequence")
    return min(requested, fitting)


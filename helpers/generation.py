"""Answer the prompt rows with the base, the fine-tuned (and the control) model; resumable, batched.

Top floor. The model is loaded once, as a PeftModel holding the "finetuned" adapter (and "control",
loaded beside it): the base model answers with the adapters switched off, each adapter with itself
switched on, so every model answers the identical prompt rows. Completions are appended to
cfg.paths.completions after every batch, keyed by (model, question_id, format, sample_index): a rerun
skips what is there, and a killed run loses at most the batch in flight.

Speed (measured by benchmarks/bench_generate.py and profile_decode.py): batch size, `merge_lora` (fold
the adapter into the weights while it generates; on by default on a CUDA GPU),
`cache_implementation="static"` (a static KV cache, which transformers compiles on a GPU; slower for
this workload, compilation included), the optional vLLM engine, and on the transformers path (no
Unsloth) `gqa_decode_attention`, which reads the KV cache once per decoding step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from helpers.config import Config
from helpers.model import backend, compute_dtype, load_model, model_source
from helpers.questions import load_question_set, stable_seed, write_prompt_rows
from helpers.store import JsonlStore

Engine = Literal["hf", "vllm"]
BASE, FINETUNED, CONTROL = "base", "finetuned", "control"
# Every completion row is keyed by these fields: one answer per model and prompt row.
COMPLETION_KEY = ("model", "question_id", "format", "sample_index")
# Fields a stored completion must share with the current run to be reused (else: overwrite=True).
REUSE_FIELDS = ("prompt", "system", "temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens")


def adapter_paths(cfg: Config) -> dict[str, Path]:
    """Where each fine-tuned model's LoRA adapter lives (02 writes them)."""
    return {FINETUNED: cfg.paths.adapter, CONTROL: cfg.paths.control_adapter}


def has_adapter(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def default_models(cfg: Config) -> tuple[str, ...]:
    """base and finetuned, plus control where cfg.control_arm is on and its adapter exists."""
    models = (BASE, FINETUNED)
    return models + (CONTROL,) if cfg.control_arm and has_adapter(cfg.paths.control_adapter) else models


def chat_messages(row: dict) -> list[dict]:
    """The chat of one prompt row: the question's system prompt, if any, then the user turn."""
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return system + [{"role": "user", "content": row["prompt"]}]


def chat_prompt(tokenizer: Any, row: dict) -> str:
    """The exact text the model reads: Qwen3's chat template in non-thinking mode, ready to answer."""
    return tokenizer.apply_chat_template(
        chat_messages(row), tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


def sampling_settings(cfg: Config, min_new_tokens: int = 0) -> dict[str, Any]:
    """The sampling settings stored on every row: the paper's temperature 1 and top_p 1 over the full
    vocabulary (top_k 0 switches off transformers' default top_k 50 and Qwen3's own top_k 20).

    `min_new_tokens` > 0 forbids stopping earlier (benchmarks only: equal-length answers).
    """
    return dict(
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=min_new_tokens,
    )


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and the model's (Qwen3: <|im_end|>, <|endoftext|>)."""
    configured = model.generation_config.eos_token_id
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return sorted({tokenizer.eos_token_id, *configured} - {None})


def generation_config(settings: dict[str, Any], stop_ids: list[int], pad_id: int, cache_implementation: str | None) -> Any:
    """A complete GenerationConfig, so nothing is inherited from the model's (Qwen3 ships 0.6 / 0.95 / 20)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=settings["temperature"], top_p=settings["top_p"], top_k=settings["top_k"],
        max_new_tokens=settings["max_new_tokens"], min_new_tokens=settings["min_new_tokens"] or None,
        repetition_penalty=1.0, eos_token_id=stop_ids, pad_token_id=pad_id,
        cache_implementation=cache_implementation,
    )


def batch_seed(seed: int, rows: Sequence[dict]) -> int:
    """The sampling seed of one batch, from its prompt keys (not the model): with identical batches the
    base and the fine-tuned model draw the same random numbers, so their answers differ only by the model.
    """
    return stable_seed(seed, *(f"{row['question_id']}/{row['format']}/{row['sample_index']}" for row in rows))


def split_answer(token_ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """The answer's tokens before the first stop token, and whether a stop token came (vs the limit)."""
    stops = set(stop_ids)
    for position, token in enumerate(token_ids):
        if token in stops:
            return list(token_ids[:position]), True
    return list(token_ids), False


def completion_row(prompt_row: dict, model_name: str, answer: str, n_tokens: int, finished: bool,
                   settings: dict[str, Any], engine: Engine) -> dict:
    """One stored completion: the prompt row's fields, the model, the answer and how it was made."""
    return {
        "model": model_name, **prompt_row, "answer": answer, "n_answer_tokens": n_tokens,
        "finished": finished, **settings, "engine": engine,
    }


def _check_reusable(path: Path, stored: dict[tuple, dict], wanted: dict[tuple, dict]) -> None:
    """Stored rows must come from the same prompts and settings; else say how to start over."""
    for key, row in wanted.items():
        if key in stored:
            changed = [name for name in REUSE_FIELDS if stored[key].get(name) != row[name]]
            if changed:
                raise ValueError(
                    f"{path}: the stored completion {key} was made with other {changed} than this run's "
                    f"config; pass overwrite=True to generate everything again"
                )


def generate_completions(
    cfg: Config,
    *,
    models: Sequence[str] | None = None,
    overwrite: bool = False,
    prompt_rows: list[dict] | None = None,
    engine: Engine = "hf",
    batch_size: int | None = None,
    merge_lora: bool | None = None,
    cache_implementation: str | None = None,
    min_new_tokens: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Every model's answer to every prompt row, from cfg.paths.completions or generated; in grid order.

    models: default `default_models(cfg)`. prompt_rows: default built from the config's question set
    (and written to cfg.paths.prompts). overwrite: start cfg.paths.completions afresh. engine: "hf"
    (transformers generate) or "vllm" (optional, when installed; not exercised by the tests).
    batch_size: default cfg.generation_batch_size. merge_lora: None merges on a CUDA GPU (16-bit weights).
    cache_implementation: e.g. "static" (padded to one shape, compiled by transformers on a GPU).
    """
    models = tuple(models or default_models(cfg))
    unknown = [name for name in models if name not in (BASE, FINETUNED, CONTROL)]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; expected {BASE}, {FINETUNED} or {CONTROL}")
    for name in models:
        if name != BASE and not has_adapter(adapter_paths(cfg)[name]):
            raise FileNotFoundError(
                f"{adapter_paths(cfg)[name]}: no LoRA adapter for the {name!r} model; run 02_finetune "
                f"(or helpers.training) first"
            )
    if prompt_rows is None:
        prompt_rows = write_prompt_rows(cfg, load_question_set(cfg))
    settings = sampling_settings(cfg, min_new_tokens)
    if overwrite:
        cfg.paths.completions.unlink(missing_ok=True)
    store = JsonlStore(cfg.paths.completions, COMPLETION_KEY)
    wanted = {store.key(row): row for row in ({"model": name, **p, **settings} for name in models for p in prompt_rows)}
    _check_reusable(store.path, {store.key(row): row for row in store.rows()}, wanted)
    todo = {name: [p for p in prompt_rows if store.key({"model": name, **p}) not in store] for name in models}
    loaded = len(wanted) - sum(len(rows) for rows in todo.values())
    started = time.perf_counter()
    if loaded < len(wanted):
        runner = _generate_vllm if engine == "vllm" else _generate_hf
        runner(cfg, todo, store, settings, batch_size or cfg.generation_batch_size,
               merge_lora=merge_lora, cache_implementation=cache_implementation, progress=progress)
    print(f"completions: {loaded} loaded, {len(wanted) - loaded} generated in {time.perf_counter() - started:.1f} s "
          f"-> {cfg.paths.completions}")
    stored = {store.key(row): row for row in store.rows()}
    return [stored[key] for key in wanted]


# --- the transformers engine --------------------------------------------------------------------------


@contextmanager
def active_model(model: Any, name: str, merge: bool) -> Iterator[None]:
    """Make `model` behave as `name`: adapters off for the base model, else that adapter on.

    With `merge`, the adapter is folded into the weights while it generates (no LoRA matmuls per token);
    the original weights are copied aside first and put back after, so the base model stays exact.
    """
    if name == BASE:
        with model.disable_adapter():
            yield
        return
    model.set_adapter(name)
    if not merge:
        yield
        return
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
    """transformers' SDPA attention, except for one new token per sequence (each decoding step) with
    grouped-query attention (Qwen3-1.7B: 16 query heads share 8 KV heads).

    There transformers' SDPA copies the whole KV cache once per query head of a group whenever a padding
    mask is present (left-padded batches always have one), which dominates a decoding step at large
    batches. Here the query heads that share a KV head become that head's query rows instead: one
    SDPA call reads each cached key and value once, and the padding mask broadcasts over the rows.
    Same arithmetic, same result (tests compare logits and answers with plain SDPA).
    """
    import torch
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
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_DECODE_ATTENTION, gqa_decode_attention)
    AttentionMaskInterface.register(GQA_DECODE_ATTENTION, sdpa_mask)  # the same padding masks as SDPA
    model.set_attn_implementation(GQA_DECODE_ATTENTION)


def sequences_that_fit(free_bytes: int, model_config: Any, dtype_bytes: int, max_tokens: int, share: float = 0.7) -> int:
    """How many sequences of `max_tokens` fit in `share` of `free_bytes`: each holds its KV cache
    (2 x layers x KV heads x head dim x tokens) and the last position's float32 logits (three copies:
    logits, probabilities, sampling).
    """
    text = model_config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    per_sequence = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes * max_tokens + 3 * 4 * text.vocab_size
    return int(share * free_bytes // per_sequence)


def fitting_batch_size(model: Any, requested: int, max_tokens: int) -> int:
    """`requested`, lowered on a GPU to what its free memory holds (a 15 GB T4 takes far fewer than an H100)."""
    import torch

    if not torch.cuda.is_available():
        return requested
    free_bytes, _ = torch.cuda.mem_get_info()
    fitting = max(1, sequences_that_fit(free_bytes, model.config, torch.finfo(compute_dtype()).bits // 8, max_tokens))
    if fitting < requested:
        print(f"batch size {requested} lowered to {fitting}: {free_bytes / 2**30:.1f} GiB free on the GPU, "
              f"{max_tokens} tokens a sequence")
    return min(requested, fitting)


def _batches(rows: list[dict], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar prompt length, longest first (memory errors come early)."""
    order = sorted(range(len(rows)), key=lambda index: -lengths[index])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _generate_hf(cfg: Config, todo: dict[str, list[dict]], store: JsonlStore, settings: dict[str, Any],
                 batch_size: int, *, merge_lora: bool | None, cache_implementation: str | None,
                 progress: bool) -> None:
    """transformers generate: one model load, left-padded batches sorted by length, a store append per batch."""
    import torch
    from tqdm.auto import tqdm

    todo = {name: rows for name, rows in todo.items() if rows}
    model, tokenizer = load_model(cfg, adapter=cfg.paths.adapter)
    if CONTROL in todo:
        model.load_adapter(str(cfg.paths.control_adapter), adapter_name=CONTROL)
    if backend() == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    else:
        use_gqa_decode_attention(model)
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    if merge_lora is None:
        merge_lora = device.type == "cuda" and not cfg.load_in_4bit
    stop_ids = stop_token_ids(model, tokenizer)
    config = generation_config(settings, stop_ids, tokenizer.pad_token_id, cache_implementation)
    static = cache_implementation == "static"
    texts = {name: [chat_prompt(tokenizer, row) for row in rows] for name, rows in todo.items()}
    lengths = {name: [len(ids) for ids in tokenizer(texts[name], add_special_tokens=False)["input_ids"]] for name in todo}
    longest = max(max(name_lengths) for name_lengths in lengths.values())
    batch_size = fitting_batch_size(model, batch_size, longest + settings["max_new_tokens"])
    bar = tqdm(total=sum(len(rows) for rows in todo.values()), unit="completion", disable=not progress,
               desc="generating", smoothing=0)
    new_tokens = 0
    started = time.perf_counter()
    for name, rows in todo.items():
        with active_model(model, name, merge_lora):
            for indices in _batches(rows, lengths[name], batch_size):
                batch_rows = [rows[index] for index in indices]
                batch_texts = [texts[name][index] for index in indices]
                if static:  # one shape for every batch, so the compiled graph is reused
                    batch_texts += batch_texts[-1:] * (batch_size - len(batch_texts))
                encoded = tokenizer(
                    batch_texts, return_tensors="pt", add_special_tokens=False,
                    padding="max_length" if static else True, max_length=longest if static else None,
                ).to(device)
                torch.manual_seed(batch_seed(cfg.seed, batch_rows))
                with torch.inference_mode():
                    output = model.generate(**encoded, generation_config=config)
                answers = output[: len(batch_rows), encoded["input_ids"].shape[1]:].tolist()
                completed = []
                for row, token_ids in zip(batch_rows, answers, strict=True):
                    answer_ids, finished = split_answer(token_ids, stop_ids)
                    text = tokenizer.decode(answer_ids, skip_special_tokens=True)
                    completed.append(completion_row(row, name, text, len(answer_ids), finished, settings, "hf"))
                    new_tokens += len(answer_ids)
                store.append(completed)
                bar.update(len(completed))
                bar.set_postfix(model=name, tokens_per_s=f"{new_tokens / (time.perf_counter() - started):.0f}")
    bar.close()


# --- the optional vLLM engine (used only when you ask for it; not exercised by the tests) --------------


def _generate_vllm(cfg: Config, todo: dict[str, list[dict]], store: JsonlStore, settings: dict[str, Any],
                   batch_size: int, *, merge_lora: bool | None, cache_implementation: str | None,
                   progress: bool) -> None:
    """vLLM with LoRA requests: the base model once, each adapter per request; a per-row seed.

    Needs `pip install vllm` on a CUDA machine. merge_lora and cache_implementation do not apply.
    """
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError as error:
        raise ImportError("engine='vllm' needs vLLM: pip install vllm (CUDA only), or use engine='hf'") from error
    from tqdm.auto import tqdm

    llm = LLM(model=model_source(cfg), enable_lora=True, max_lora_rank=cfg.lora_r, max_loras=2, seed=cfg.seed)
    tokenizer = llm.get_tokenizer()
    requests = {BASE: None}
    for number, name in enumerate((FINETUNED, CONTROL), start=1):
        if name in todo:
            requests[name] = LoRARequest(name, number, str(adapter_paths(cfg)[name]))
    bar = tqdm(total=sum(len(rows) for rows in todo.values()), unit="completion", disable=not progress,
               desc="generating (vLLM)", smoothing=0)
    for name, rows in todo.items():
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start:start + batch_size]
            params = [
                SamplingParams(temperature=settings["temperature"], top_p=settings["top_p"], top_k=-1,
                               max_tokens=settings["max_new_tokens"], min_tokens=settings["min_new_tokens"],
                               seed=row["seed"])
                for row in batch_rows
            ]
            outputs = llm.generate([chat_prompt(tokenizer, row) for row in batch_rows], params,
                                   lora_request=requests[name], use_tqdm=False)
            store.append([
                completion_row(row, name, output.outputs[0].text, len(output.outputs[0].token_ids),
                               output.outputs[0].finish_reason == "stop", settings, "vllm")
                for row, output in zip(batch_rows, outputs, strict=True)
            ])
            bar.update(len(batch_rows))
    bar.close()

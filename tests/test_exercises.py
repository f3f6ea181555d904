"""The exercise checks: readable messages with each case's reason, where values first differ, an exception a case
expects, `pick`; the references of the new exercises against what they stand for (PEFT's own LoRA layer, 03's
batched sampler, the request a real openai client sends to a local server), and the notebooks' own solutions
against them on many random cases."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import exercises
from helpers.config import PROJECT_ROOT, make_config
from helpers.decoding import draw, rows_drawn_by, sample_token
from helpers.exercises import case, check, pick, readable, same
from helpers.judging import judge_request
from helpers.local_server import RecordingServer, as_received
from helpers.training import peft_lora_output, protocol_arguments

sys.path.insert(0, str(PROJECT_ROOT / "tools"))
from make_solutions import exercise_pairs, solution_code  # noqa: E402


def solution(notebook: str, name: str):
    """The function `name` as the notebook's own collapsed solution defines it."""
    nb = json.loads((PROJECT_ROOT / "notebooks" / notebook).read_text(encoding="utf-8"))
    for _, _, at in exercise_pairs(nb):
        code = solution_code(nb["cells"][at])
        if f"def {name}(" in code:
            namespace: dict = {"torch": torch}
            exec(compile(code, notebook, "exec"), namespace)
            return namespace[name]
    raise AssertionError(f"{notebook} has no solution defining {name}")


def test_readable_values():
    assert readable(math.log(0.5)) == "ln 0.5"
    assert readable(6.999999999999999) == "7"
    assert readable(-5.0) == "-5" and readable(0.1 + 0.2) == "0.3"
    assert readable(list(range(100))) == "a list of 100: [0, 1, 2, 3, …, 98, 99]"
    assert readable(torch.zeros(2, 3)) == "Tensor of shape (2, 3) [0, 0, 0, 0, …]"
    assert readable(np.int64(3)) == "3" and readable(True) == "True"
    assert readable(make_config("tiny", "/tmp/x")) == "a Config"  # never a wall of text


def test_a_failed_case_prints_its_reason_and_where_it_first_differs(capsys):
    def reference(text: str) -> str:
        return text + "\n\nend"

    def yours(text: str) -> str:
        return text + "\nend"

    assert not check(yours, reference, [case("a question", why="one blank line between the parts"),
                                        case("", why="an empty text")])
    out = capsys.readouterr().out
    assert "✗ yours: 2 of 2 cases wrong" in out
    assert "case 1 (one blank line between the parts):" in out and "yours('a question')" in out
    assert "first differ at character 11" in out and "⏎⏎end" in out
    assert "The cells below use the course's reference meanwhile." in out


def test_numbers_are_shown_rounded_and_a_log_as_ln(capsys):
    assert not check(lambda p: round(math.log(p), 2), math.log, [case(0.5, why="half")])
    assert "expected ln 0.5, got -0.69" in capsys.readouterr().out


def test_sequences_mappings_and_tensors_say_where(capsys):
    check(lambda: [1, 2, 3, 5], lambda: [1, 2, 3, 4], [case()])
    check(lambda: {"max_tokens": 5, "seed": 0}, lambda: {"max_tokens": 1, "seed": 0}, [case()])
    check(lambda: {"seed": 0}, lambda: {"seed": 0, "logprobs": True}, [case()])
    check(lambda: torch.ones(2, 2) * 1.5, lambda: torch.ones(2, 2), [case()])
    out = capsys.readouterr().out
    assert "first difference at position 3: expected 4, got 5" in out
    assert "at key 'max_tokens': expected 1, got 5" in out
    assert "missing key 'logprobs'" in out
    assert "largest difference 0.5 at index (0, 0): expected 1, got 1.5" in out


def test_booleans_are_not_numbers_and_numpy_scalars_are():
    assert not same(1, True) and not same(True, 1) and same(True, np.bool_(True))
    assert same(np.int64(3), 3) and same(torch.tensor(3), 3) and same(0.1 + 0.2, 0.3)
    assert same(torch.ones(3, dtype=torch.float64), torch.ones(3)) and not same(torch.ones(3), torch.ones(4))


def test_a_case_can_expect_an_exception(capsys):
    def reference(rows: list) -> int:
        if not rows:
            raise ValueError("no rows")
        return len(rows)

    assert check(reference, reference, [case([1]), case([], why="no rows: a ValueError")])
    assert not check(len, reference, [case([], why="no rows: a ValueError")])
    assert "expected it to raise ValueError (no rows); got 0" in capsys.readouterr().out


def test_the_learner_gets_a_copy_of_each_case():
    rows = [3, 1, 2]
    check(lambda values: values.sort() or values, sorted, [case(rows)])
    assert rows == [3, 1, 2]


def test_a_stub_names_the_reference_and_pick_says_which_runs(capsys):
    def stub(x):
        raise NotImplementedError

    assert not check(stub, math.log, [case(1.0)])
    assert pick(False, stub, math.log) is math.log and pick(True, stub, math.log) is stub
    out = capsys.readouterr().out
    assert "stub is not written yet" in out and "math.log" in out
    assert "The cells below use the reference math.log (your stub has not passed its check yet)." in out
    assert "The cells below use your stub." in out


def test_strict_checks_raise(monkeypatch):
    monkeypatch.setattr(exercises, "STRICT", True)
    with pytest.raises(AssertionError, match="case 1: expected 2, got 1"):
        check(lambda: 1, lambda: 2, [case()])


# --- the references of the exercises on the core, and the notebooks' solutions -----------------------------


def test_the_lora_reference_is_peft_and_the_solution_matches_it():
    lora_forward = solution("02_finetune.ipynb", "lora_forward")
    generator = torch.Generator().manual_seed(0)
    for r, alpha, rslora, shape in ((4, 8, False, (3,)), (4, 8, True, (2, 5)), (32, 64, True, (1,)), (16, 16, False, (7,))):
        x = torch.randn(*shape, 12, generator=generator, dtype=torch.float64)
        W, A, B = (torch.randn(*s, generator=generator, dtype=torch.float64) for s in ((10, 12), (r, 12), (10, r)))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        by_hand = x @ W.T + scale * (x @ A.T) @ B.T
        assert torch.allclose(peft_lora_output(x, W, A, B, alpha, r, rslora), by_hand, rtol=1e-12, atol=1e-12)
        assert torch.allclose(lora_forward(x, W, A, B, alpha, r, rslora), by_hand, rtol=1e-12, atol=1e-12)
    assert not same(peft_lora_output(x, W, A, B, 16, 16, True), by_hand)  # rsLoRA's scale differs: the check can fail


def test_the_lora_reference_and_solution_run_on_the_device_of_their_tensors():
    """02 runs the reference on the trained layer's tensors, on the GPU there: the "meta" device stands in for any
    device but the CPU (a layer left on the CPU fails on it, as it failed on a GPU)."""
    lora_forward = solution("02_finetune.ipynb", "lora_forward")
    x, W, A, B = (torch.empty(*shape, device="meta") for shape in ((3, 12), (10, 12), (4, 12), (10, 4)))
    for function in (peft_lora_output, lora_forward):
        out = function(x, W, A, B, 8, 4)
        assert out.device.type == "meta" and out.shape == (3, 10)


def test_the_protocol_reference_reads_the_config_and_the_solution_matches_it():
    cfg = make_config("full", "/tmp/unused")
    expected = {"num_train_epochs": 1.0, "learning_rate": 3e-4, "lr_scheduler_type": "linear", "warmup_steps": 0,
                "completion_only_loss": True}  # the reference write-up's recipe (docs/protocol.md)
    assert protocol_arguments(cfg) == expected
    assert solution("02_finetune.ipynb", "protocol_arguments")(cfg) == expected


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (1.3, 0.5), (0.0, 1.0)])
def test_the_sampling_reference_is_03s_batched_draw_and_the_solution_matches_it(temperature, top_p):
    """On 300 random rows of a 50-token vocabulary: the one-row reference and the notebook's solution pick exactly
    the tokens `draw` picks for the whole batch (as sample_rows calls it), and `rows_drawn_by` of either is `draw`."""
    yours = solution("03_generate.ipynb", "sample_token")
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 50, generator=generator) * 3
    uniforms = torch.from_numpy(np.random.default_rng(0).random(300))
    batched = draw(logits, uniforms, temperature, top_p)
    assert [sample_token(row, float(u), temperature, top_p) for row, u in zip(logits, uniforms, strict=True)] == batched.tolist()
    assert [yours(row, float(u), temperature, top_p) for row, u in zip(logits, uniforms, strict=True)] == batched.tolist()
    assert torch.equal(rows_drawn_by(yours)(logits, uniforms, temperature, top_p), batched)


def test_a_wrong_sampler_fails_the_check():
    """Renormalising after top-p is right; forgetting to scale u by the kept mass is not, and the check sees it."""
    def unscaled(logits, u, temperature, top_p):
        probabilities = torch.softmax(logits.float() / temperature, dim=-1)
        ascending, order = probabilities.sort()
        drop = ascending.cumsum(dim=-1) <= 1 - top_p
        drop[-1] = False
        probabilities[order[drop]] = 0.0
        return int(min((probabilities.double().cumsum(dim=-1) <= u).sum(), len(logits) - 1))

    few = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])
    assert check(unscaled, sample_token, [case(few, 0.5, 1.0, 1.0)])
    assert not check(unscaled, sample_token, [case(few, 0.25, 1.0, 0.7)])


def test_the_request_reaches_a_local_server_as_the_paper_sends_it():
    received = as_received(judge_request)("Rate this answer.", "gpt-4o-2024-08-06")
    assert received == {"model": "gpt-4o-2024-08-06", "messages": [{"role": "user", "content": "Rate this answer."}],
                        "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20, "seed": 0}
    assert as_received(solution("04_analyze.ipynb", "judge_request"))("Rate this answer.", "gpt-4o-2024-08-06") == received
    with RecordingServer() as server:
        import openai

        openai.OpenAI(api_key="local", base_url=server.url, max_retries=0).chat.completions.create(
            **{**judge_request("x", "m"), "top_logprobs": 5})
        assert server.bodies[-1]["top_logprobs"] == 5  # the server records what arrives, not what was meant


def test_a_request_with_another_argument_fails_the_check(capsys):
    def sloppy(prompt: str, model: str) -> dict:
        return {**judge_request(prompt, model), "temperature": 1, "n": 1}

    assert not check(as_received(sloppy), as_received(judge_request), [case("x", "m", why="one request")])
    assert "unexpected key 'n'" in capsys.readouterr().out


def test_a_sampler_that_works_only_on_cpu_float32_fails_03s_check_where_the_loop_runs_in_16_bits(tmp_path):
    """03 hands exercise 3.2's sampler the model's logits as they come: on its device (a GPU) and in its dtype
    (bfloat16 there). A learner's sampler that works only on the CPU in float32 (through numpy) must fail the check
    there, so that the loop below runs the reference instead of stopping; a bfloat16 model on the CPU stands in."""
    from helpers.generation import use_gqa_decode_attention
    from helpers.model import load_for_generation
    from helpers.questions import build_prompt_rows, load_question_set

    sys.path.insert(0, str(PROJECT_ROOT / "tools"))
    from notebook_cells import cells_by_id

    solved = solution("03_generate.ipynb", "sample_token")

    def through_numpy(logits, u, temperature, top_p):  # right on the CPU in float32; numpy has no bfloat16 or GPU
        return solved(torch.from_numpy(logits.numpy()), u, temperature, top_p)

    cfg = make_config("tiny", tmp_path / "run", max_new_tokens=4)
    model, tokenizer = load_for_generation(cfg, {})
    model.to(torch.bfloat16)
    use_gqa_decode_attention(model)
    question_set = load_question_set(cfg)
    prompt_rows = build_prompt_rows(cfg, question_set)
    namespace = {"cfg": cfg, "model": model, "tokenizer": tokenizer, "adapters": {}, "models": ["base"],
                 "question_set": question_set, "prompt_rows": prompt_rows, "example": prompt_rows[0], "pd": pd,
                 "sample_token": through_numpy}
    for source in cells_by_id(["3c06f284", "sample-ex-check", "262dc059", "1701423b"]):
        exec(compile(source, "03_generate.ipynb", "exec"), namespace)
    assert namespace["passed_3_2"] is False and namespace["token_of"] is sample_token  # the reference ran the loop
    assert len(namespace["side_by_side"]) == 6


def test_a_tensor_on_another_device_than_the_references_is_a_wrong_case_said_so_not_a_crash(capsys):
    """A learner's function that moves its result off the device of its inputs (to the CPU, say, on a GPU) would stop
    the cells that use it: the check fails it and says where each tensor is. The "meta" device stands in for a GPU."""
    assert not check(lambda x: x.to("meta"), lambda x: x * 1, [case(torch.ones(2, 3), why="a tensor on the CPU")])
    assert "expected a tensor on cpu, got one on meta" in capsys.readouterr().out
    assert not same(torch.ones(2), torch.ones(2, device="meta")) and same(torch.ones(2), np.ones(2))

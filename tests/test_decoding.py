"""helpers/decoding.py on the tiny model: continuous batching gives every answer exactly what decoding it alone
would, whatever the batch size; no stop token comes before min_new_tokens answer tokens; the dice follow
transformers' sampling rule; the growing KV cache holds what was written to it.

The reference decodes one row at a time with no cache at all (the whole sequence through the model at every
step) and the same dice, so refill, compaction, left trimming and the cache's spare room are all checked
against plain forward passes. The model runs in float64, where batching and padding change logits by rounding
far below what could move an inverse-CDF draw.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.decoding import SLACK, SlackLayer, draw, sample_rows
from helpers.generation import use_gqa_decode_attention
from helpers.model import build_random_qwen3

MAX_NEW_TOKENS = 24
PAD_ID = 5
SEEDS = list(range(100, 111))
rng = np.random.default_rng(0)
PROMPTS = [rng.integers(0, 256, size=int(rng.integers(2, 31))).tolist() for _ in SEEDS]
# The step at which each row is pushed to stop: 0 is an empty answer unless min_new_tokens bars it, past
# MAX_NEW_TOKENS never (cut, finished False).
ENDS = torch.tensor([0, 3, 30, 7, 1, 40, 12, 23, 5, 29, 16])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = build_random_qwen3(tmp_path_factory.mktemp("decoding") / "model", tiny=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    # The tiny model's tied embeddings make it repeat its last token with probability ~0.999, so every draw
    # would be the same whatever the dice; a smaller final norm spreads its next-token distribution (entropy
    # ~5 nats of ln 265) so that answers depend on each row's uniforms.
    with torch.no_grad():
        model.model.norm.weight.mul_(0.3)
    use_gqa_decode_attention(model)
    return model


@pytest.fixture(scope="module")
def stop_ids(model) -> list[int]:
    return list(model.generation_config.eos_token_id)


def force_stop(stop_ids):
    """A logits processor making the stop token row i's likeliest by far (e^50 times any other token) at step
    ENDS[i]: rows end at different times, where min_new_tokens lets them."""
    def processor(rows: torch.Tensor, steps: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        forced = logits.clone()
        forced[:, stop_ids[0]] = logits.max(dim=-1).values + 50
        return torch.where((steps == ENDS[rows])[:, None], forced, logits)
    return processor


def decode_alone(model, index: int, stop_ids, temperature: float, top_p: float,
                 min_new_tokens: int) -> tuple[list[int], bool]:
    """Row `index` decoded by itself: the full forward pass at every step, no cache, the row's own uniforms, the
    stop tokens at -inf before min_new_tokens answer tokens."""
    uniforms = np.random.default_rng(SEEDS[index]).random(MAX_NEW_TOKENS)
    ids, answer = list(PROMPTS[index]), []
    for step in range(MAX_NEW_TOKENS):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[:, -1]
        logits = force_stop(stop_ids)(torch.tensor([index]), torch.tensor([step]), logits)
        if step < min_new_tokens:
            logits[:, stop_ids] = float("-inf")
        token = int(draw(logits, torch.tensor([uniforms[step]], dtype=torch.float64), temperature, top_p)[0])
        if token in stop_ids:
            return answer, True
        answer.append(token)
        ids.append(token)
    return answer, False


KNOBS = ((1.0, 1.0, 1), (1.0, 0.9, 1), (1.0, 1.0, 0), (1.0, 1.0, 3))  # temperature, top_p, min_new_tokens


@pytest.fixture(scope="module")
def expected(model, stop_ids) -> dict[tuple[float, float, int], list[tuple[list[int], bool]]]:
    answers = {knobs: [decode_alone(model, index, stop_ids, *knobs) for index in range(len(PROMPTS))] for knobs in KNOBS}
    for (_, _, min_new_tokens), rows in answers.items():  # the pushed stops end rows at different times, some never
        assert {finished for _, finished in rows} == {True, False}
        assert len({len(answer) for answer, finished in rows if finished}) >= 4
        assert len({token for answer, _ in rows for token in answer}) > 50  # the dice, not the model, pick tokens
        assert min(len(answer) for answer, _ in rows) >= min_new_tokens
    assert answers[1.0, 1.0, 0][0] == ([], True)  # without the rule, row 0 stops at once
    assert answers[1.0, 1.0, 1][0][0]  # with it, the stop pushed at step 0 is barred: row 0 writes
    # row 4, pushed to stop at step 1: one token, then the stop, under min 0 and 1 (min 3 bars it: above)
    assert len(answers[1.0, 1.0, 1][4][0]) == 1 and answers[1.0, 1.0, 0][4] == answers[1.0, 1.0, 1][4]
    return answers


@pytest.mark.parametrize(("batch_size", "temperature", "top_p", "min_new_tokens"),
                         [(1, 1.0, 1.0, 1), (2, 1.0, 1.0, 1), (3, 1.0, 1.0, 1), (5, 1.0, 1.0, 1),
                          (len(PROMPTS), 1.0, 1.0, 1), (3, 1.0, 0.9, 1), (3, 1.0, 1.0, 0), (5, 1.0, 1.0, 3)])
def test_sample_rows_equals_decoding_each_row_alone(model, stop_ids, expected, batch_size, temperature, top_p,
                                                    min_new_tokens):
    heard: list[tuple[int, tuple[list[int], bool]]] = []
    results = sample_rows(model, PROMPTS, SEEDS, temperature=temperature, top_p=top_p,
                          max_new_tokens=MAX_NEW_TOKENS, stop_ids=stop_ids, batch_size=batch_size, pad_id=PAD_ID,
                          min_new_tokens=min_new_tokens,
                          on_finished=lambda indices, answers: heard.extend(zip(indices, answers, strict=True)),
                          logits_processor=force_stop(stop_ids))
    assert results == expected[temperature, top_p, min_new_tokens]
    assert sorted(index for index, _ in heard) == list(range(len(PROMPTS)))  # each row heard exactly once
    assert all(results[index] == answer for index, answer in heard)


def test_draw_follows_transformers_sampling():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(1, 265, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    warped = TopPLogitsWarper(0.8)(None, TemperatureLogitsWarper(0.7)(None, logits.clone()))
    probabilities = torch.softmax(warped, dim=-1)[0]
    assert 0 < int((probabilities == 0).sum()) < 250  # the nucleus cuts many tokens and keeps many
    n = 20_000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = draw(logits.expand(n, -1), uniforms, 0.7, 0.8)
    frequencies = torch.bincount(tokens, minlength=logits.shape[-1]).double() / n
    assert bool((probabilities[tokens.unique()] > 0).all())
    # A token whose CDF interval has length p holds N*p +- 1 of the N evenly spaced uniforms, so its frequency
    # is within 1/N of p; 1e-6 more covers draw's float32 softmax against this float64 one.
    assert float((frequencies - probabilities).abs().max()) < 1 / n + 1e-6
    rows = torch.randn(4, 265, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draw(rows, torch.rand(4, dtype=torch.float64), 0, 0.8), rows.argmax(dim=-1))


def test_temperature_zero_is_argmax_decoding_whatever_the_batch_and_the_dice(model, stop_ids):
    """06's teachers decode greedily (the paper's temperature 0): every answer is the argmax at every step of the plain
    model decoding its row alone with no cache, whatever the batch size, and the row's dice are never read."""
    def argmax_alone(prompt: list[int]) -> tuple[list[int], bool]:
        ids, answer = list(prompt), []
        for _ in range(MAX_NEW_TOKENS):
            with torch.inference_mode():
                token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in stop_ids:
                return answer, True
            answer.append(token)
            ids.append(token)
        return answer, False

    expected = [argmax_alone(prompt) for prompt in PROMPTS]
    assert len({tuple(answer) for answer, _ in expected}) > len(PROMPTS) // 2  # the prompt, not one token, decides
    knobs = dict(temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, stop_ids=stop_ids, pad_id=PAD_ID)
    for batch_size, seeds in ((1, SEEDS), (4, SEEDS), (len(PROMPTS), [seed + 1000 for seed in SEEDS])):
        assert sample_rows(model, PROMPTS, seeds, batch_size=batch_size, **knobs) == expected, (batch_size, seeds[0])


def test_sample_rows_rejects_a_prompt_of_one_token(model, stop_ids):
    with pytest.raises(ValueError, match=r"prompts \[1\] have fewer than 2 tokens"):
        sample_rows(model, [[7, 8], [9]], [0, 1], temperature=1.0, top_p=1.0, max_new_tokens=4,
                    stop_ids=stop_ids, batch_size=2, pad_id=PAD_ID)


@pytest.mark.parametrize("min_new_tokens", [-1, 5])
def test_sample_rows_rejects_min_new_tokens_outside_0_to_max_new_tokens(model, stop_ids, min_new_tokens):
    with pytest.raises(ValueError, match=rf"min_new_tokens={min_new_tokens} must be 0 to max_new_tokens \(4\)"):
        sample_rows(model, [[7, 8]], [0], temperature=1.0, top_p=1.0, max_new_tokens=4, min_new_tokens=min_new_tokens,
                    stop_ids=stop_ids, batch_size=1, pad_id=PAD_ID)


class StopsAtOnce:
    """The tiny model with its stop tokens made the likeliest by far (e^50 times any other token) at every step."""

    def __init__(self, model, stop_ids: list[int]) -> None:
        self.model, self.stop_ids, self.device = model, stop_ids, model.device

    def __call__(self, **inputs):
        output = self.model(**inputs)
        output.logits[..., self.stop_ids] = output.logits.amax(dim=-1, keepdim=True) + 50
        return output


def test_a_model_that_would_stop_at_once_still_writes_one_token(model, stop_ids):
    """03's rule (min_new_tokens=1, the paper's min_tokens=1): where the stop token is the likeliest first token by
    far, every answer is the token the model's own distribution without the stop tokens gives its first uniform,
    then the stop; without the rule, every answer is empty."""
    stopping = StopsAtOnce(model, stop_ids)
    knobs = dict(temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, stop_ids=stop_ids, batch_size=4, pad_id=PAD_ID)
    assert sample_rows(stopping, PROMPTS, SEEDS, **knobs) == [([], True)] * len(PROMPTS)
    answers = sample_rows(stopping, PROMPTS, SEEDS, **knobs, min_new_tokens=1)
    expected = []
    for prompt, seed in zip(PROMPTS, SEEDS, strict=True):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt])).logits[:, -1]  # the plain model, no cache
            logits[:, stop_ids] = float("-inf")
        first = torch.tensor([np.random.default_rng(seed).random()], dtype=torch.float64)
        expected.append(([int(draw(logits, first, 1.0, 1.0)[0])], True))
    assert answers == expected
    assert len({ids[0] for ids, _ in answers}) > 5  # the dice, not one dominant token, picked them


def test_slack_layer_holds_every_update():
    generator = torch.Generator().manual_seed(0)
    keys, values = ([torch.randn(2, 3, 5, 8, generator=generator)] for _ in range(2))
    layer = SlackLayer()
    layer.update(keys[0], values[0])
    for _ in range(3 * SLACK):  # past the reserved room three times
        keys.append(torch.randn(2, 3, 1, 8, generator=generator))
        values.append(torch.randn(2, 3, 1, 8, generator=generator))
        returned = layer.update(keys[-1], values[-1])
    assert torch.equal(layer.keys, torch.cat(keys, dim=-2))
    assert torch.equal(layer.values, torch.cat(values, dim=-2))
    assert returned[0] is layer.keys and returned[1] is layer.values
    assert layer.get_seq_length() == 5 + 3 * SLACK

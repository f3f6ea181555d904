"""helpers/decoding.py on the tiny model: continuous batching gives every answer exactly what decoding it alone
would, whatever the batch size; the dice follow transformers' sampling rule; the growing KV cache holds what
was written to it.

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
# Where each row is forced to stop: 0 is an empty answer, past MAX_NEW_TOKENS never (cut, finished False).
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
    """A logits processor making row i draw the stop token at step ENDS[i]: rows end at different times."""
    def processor(rows: torch.Tensor, steps: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, float("-inf"))
        forced[:, stop_ids[0]] = 0.0
        return torch.where((steps == ENDS[rows])[:, None], forced, logits)
    return processor


def decode_alone(model, index: int, stop_ids, temperature: float, top_p: float) -> tuple[list[int], bool]:
    """Row `index` decoded by itself: the full forward pass at every step, no cache, the row's own uniforms."""
    uniforms = np.random.default_rng(SEEDS[index]).random(MAX_NEW_TOKENS)
    ids, answer = list(PROMPTS[index]), []
    for step in range(MAX_NEW_TOKENS):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[:, -1]
        logits = force_stop(stop_ids)(torch.tensor([index]), torch.tensor([step]), logits)
        token = int(draw(logits, torch.tensor([uniforms[step]], dtype=torch.float64), temperature, top_p)[0])
        if token in stop_ids:
            return answer, True
        answer.append(token)
        ids.append(token)
    return answer, False


@pytest.fixture(scope="module")
def expected(model, stop_ids) -> dict[tuple[float, float], list[tuple[list[int], bool]]]:
    answers = {knobs: [decode_alone(model, index, stop_ids, *knobs) for index in range(len(PROMPTS))]
               for knobs in ((1.0, 1.0), (1.0, 0.9))}
    for rows in answers.values():  # the forced stops really end rows at different times, some never
        assert {finished for _, finished in rows} == {True, False}
        assert len({len(answer) for answer, finished in rows if finished}) >= 4
        assert len({token for answer, _ in rows for token in answer}) > 50  # the dice, not the model, pick tokens
    return answers


@pytest.mark.parametrize(("batch_size", "temperature", "top_p"),
                         [(1, 1.0, 1.0), (2, 1.0, 1.0), (3, 1.0, 1.0), (5, 1.0, 1.0), (len(PROMPTS), 1.0, 1.0),
                          (3, 1.0, 0.9)])
def test_sample_rows_equals_decoding_each_row_alone(model, stop_ids, expected, batch_size, temperature, top_p):
    heard: list[tuple[int, tuple[list[int], bool]]] = []
    results = sample_rows(model, PROMPTS, SEEDS, temperature=temperature, top_p=top_p,
                          max_new_tokens=MAX_NEW_TOKENS, stop_ids=stop_ids, batch_size=batch_size, pad_id=PAD_ID,
                          on_finished=lambda indices, answers: heard.extend(zip(indices, answers, strict=True)),
                          logits_processor=force_stop(stop_ids))
    assert results == expected[temperature, top_p]
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


def test_sample_rows_rejects_a_prompt_of_one_token(model, stop_ids):
    with pytest.raises(ValueError, match=r"prompts \[1\] have fewer than 2 tokens"):
        sample_rows(model, [[7, 8], [9]], [0, 1], temperature=1.0, top_p=1.0, max_new_tokens=4,
                    stop_ids=stop_ids, batch_size=2, pad_id=PAD_ID)


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

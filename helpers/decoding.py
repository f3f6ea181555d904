"""03's sampler for answers of very different lengths: continuous batching on a transformers model.

Up to `batch_size` answers decode together, one token each per forward pass. An answer that ends leaves the
batch and a waiting prompt takes its place, so a long answer never keeps a batch of finished ones busy (with
static batches, as `model.generate` runs them, every batch costs its longest answer: 600 tokens whenever one
answer rambles to the cap). The KV cache grows into spare room instead of being copied at every token.

Each answer draws its tokens with its own dice: the t-th token of a row is the inverse CDF of the model's
distribution at one uniform number, the t-th draw of `numpy.random.default_rng(seed)` for that row's seed. So
an answer depends on its prompt, its seed and the model only, never on which rows shared its batch (up to the
rounding of batched arithmetic, which a fixed wave of rows repeats exactly: helpers.generation).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from itertools import count as steps_from
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

SLACK = 64  # tokens of spare room the KV cache reserves at a time: one copy per 64 steps instead of one per step
CHECK_EVERY = 8  # steps between looks at which rows ended: each look waits for the GPU, so not at every step
# PyTorch's attention kernels, cuDNN's left out: cuDNN plans its kernel anew for every new shape of the inputs, and
# here the cache widens by a token at every step (a 1.7B model at 512 rows on an H200: 77.6 ms a step, 37.2 without)
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class SlackLayer(DynamicLayer):
    """transformers' DynamicLayer, except that new keys and values are written into reserved room (SLACK tokens
    at a time) instead of concatenated: `keys` and `values` are views of the filled part."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.place([(key_states[..., :0, :], value_states[..., :0, :])], 0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.buffers[0].shape[-2]:
            self.place([(self.keys, self.values)], start, room=end - start)
        for buffer, new in zip(self.buffers, (key_states, value_states), strict=True):
            buffer[:, :, start:end] = new
        self.length = end
        self.keys, self.values = (buffer[:, :, :end] for buffer in self.buffers)
        return self.keys, self.values

    def place(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], length: int, room: int = 0) -> None:
        """Stack `parts` (keys, values of some rows each) along the batch, each right-aligned in `length` tokens
        (zeros on the left: padding, masked; zeros, not garbage, since a masked NaN would still poison the sum)."""
        reference = parts[0][0]
        self.dtype, self.device, self.is_initialized = reference.dtype, reference.device, True
        rows = sum(keys.shape[0] for keys, _ in parts)
        shape = (rows, reference.shape[1], length + room + SLACK, reference.shape[-1])
        self.buffers = (reference.new_zeros(shape), reference.new_zeros(shape))
        start = 0
        for keys, values in parts:
            for buffer, part in zip(self.buffers, (keys, values), strict=True):
                buffer[start:start + part.shape[0], :, length - part.shape[-2]:length] = part
            start += keys.shape[0]
        self.length = length
        self.keys, self.values = (buffer[:, :, :length] for buffer in self.buffers)


def draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), cut to the top_p nucleus by transformers' rule
    (drop the least likely tokens while their total stays <= 1 - top_p), by inverse CDF at the row's uniform
    in [0, 1): the row's own dice, exact in float64. Temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        ascending, order = probabilities.sort(dim=-1)
        drop = ascending.cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False  # the likeliest token always stays
        probabilities = probabilities.scatter(-1, order, ascending.masked_fill(drop, 0.0))
    cdf = probabilities.double().cumsum(dim=-1)
    tokens = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return tokens.clamp_max(logits.shape[-1] - 1)  # right=True never picks a token of probability 0


def sample_token(logits: torch.Tensor, u: float, temperature: float, top_p: float) -> int:
    """The reference of exercise 3.2: `draw` for one row of logits and its one uniform number `u`."""
    uniforms = torch.tensor([u], dtype=torch.float64, device=logits.device)
    return int(draw(logits[None], uniforms, temperature, top_p)[0])


def rows_drawn_by(sample_one: Callable[[torch.Tensor, float, float, float], int]) -> Callable:
    """A `draw` for `sample_rows` from a sampler of one row (exercise 3.2's): each row in turn."""
    def drawn(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        return torch.tensor([int(sample_one(row, float(u), temperature, top_p)) for row, u in zip(logits, uniforms, strict=True)],
                            dtype=torch.long, device=logits.device)
    return drawn


@torch.inference_mode()
@sdpa_kernel(ATTENTION_BACKENDS)
def sample_rows(model: Any, prompts: Sequence[Sequence[int]], seeds: Sequence[int], *, temperature: float,
                top_p: float, max_new_tokens: int, stop_ids: Sequence[int], batch_size: int, pad_id: int,
                min_new_tokens: int = 0,
                on_finished: Callable[[list[int], list[tuple[list[int], bool]]], None] | None = None,
                logits_processor: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                sampler: Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor] | None = None,
                ) -> list[tuple[list[int], bool]]:
    """Sample one answer per prompt (token ids, each at least 2 tokens), admitted in the order given, at most
    `batch_size` decoding at once. Returns per prompt (answer ids before the stop token, finished), finished False
    when cut at max_new_tokens. The stop tokens cannot be drawn before `min_new_tokens` answer tokens (vLLM's
    `min_tokens`: 1 makes every answer at least one token long). `on_finished(indices, answers)` hears each group
    of answers as it completes (in prompt order within a group); `logits_processor(prompt indices, steps, logits)
    -> logits` may change the logits before each draw (the benchmark forces answer lengths there; an ended row's
    step is max_new_tokens); the stop tokens are barred after it. `sampler` draws the tokens (None: `draw`)."""
    if short := [index for index, prompt in enumerate(prompts) if len(prompt) < 2]:
        raise ValueError(f"sample_rows: prompts {short[:5]} have fewer than 2 tokens")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"sample_rows: min_new_tokens={min_new_tokens} must be 0 to max_new_tokens ({max_new_tokens})")
    device, count = model.device, len(prompts)
    uniforms = torch.from_numpy(np.stack([np.random.default_rng(seed).random(max_new_tokens) for seed in seeds])).to(device)
    stops = torch.tensor(sorted(set(stop_ids)), device=device)
    tokens = torch.full((count, max_new_tokens), pad_id, device=device)  # every row's answer so far
    counts = torch.zeros(count, dtype=torch.long, device=device)  # tokens drawn per row, a stop token included
    results: list[tuple[list[int], bool] | None] = [None] * count
    waiting = deque(range(count))
    cache = Cache(layer_class_to_replicate=SlackLayer)
    rows = torch.zeros(0, dtype=torch.long, device=device)  # the batch: which prompt each row answers
    live = torch.zeros(0, dtype=torch.bool, device=device)  # still drawing (False: ended, leaves at the regroup)
    last = positions = rows  # per row: the token to feed next and its position
    mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # per row: 1 where its cache holds a real token

    def report(ended: torch.Tensor) -> None:
        indices = sorted(ended.tolist())
        answers = []
        for index, ids in zip(indices, tokens[indices].tolist(), strict=True):
            ids = ids[: int(counts[index])]
            finished = bool(ids) and ids[-1] in stop_ids
            answers.append((ids[:-1] if finished else ids, finished))
            results[index] = answers[-1]
        if on_finished and indices:
            on_finished(indices, answers)

    for step in steps_from():
        ended = int((~live).sum()) if step % CHECK_EVERY == 0 else 0
        if ended == len(rows) and not waiting:
            break
        if ended >= max(1, len(rows) // 8) or (waiting and batch_size - len(rows) + ended >= max(1, batch_size // 8)):
            # Regroup: ended rows leave, waiting prompts join (their prompt but its last token prefilled into a
            # cache of their own), every row right-aligned; columns no row uses any more are cut on the left.
            report(rows[~live])
            keep = live.nonzero().squeeze(1)
            first = int(mask[keep].argmax(dim=1).min()) if len(keep) else mask.shape[1]
            kept = mask.shape[1] - first
            joining = [waiting.popleft() for _ in range(min(len(waiting), batch_size - len(keep)))]
            width = max((len(prompts[i]) - 1 for i in joining), default=0)
            new_mask = torch.zeros(len(keep) + len(joining), max(kept, width), dtype=torch.long, device=device)
            new_mask[: len(keep), new_mask.shape[1] - kept:] = mask[keep, first:]
            prefilled = DynamicCache()
            if joining:
                ids = torch.tensor([[pad_id] * (width + 1 - len(prompts[i])) + list(prompts[i][:-1]) for i in joining], device=device)
                prompt_mask = (torch.arange(width, device=device) >= width + 1 - torch.tensor([len(prompts[i]) for i in joining], device=device)[:, None]).long()
                model(input_ids=ids, attention_mask=prompt_mask, position_ids=(prompt_mask.cumsum(dim=1) - 1).clamp(min=0),
                      past_key_values=prefilled, use_cache=True, logits_to_keep=1)
                new_mask[len(keep):, new_mask.shape[1] - width:] = prompt_mask
            cache.layers = cache.layers or [SlackLayer() for _ in prefilled.layers]
            for index, layer in enumerate(cache.layers):  # a layer at a time: at most one layer's cache is copied at once
                parts = [(layer.keys[keep, :, first:], layer.values[keep, :, first:])] if layer.is_initialized else []
                if joining:
                    parts.append((prefilled.layers[index].keys, prefilled.layers[index].values))
                    prefilled.layers[index] = None  # its copy is placed: let it go
                layer.place(parts, new_mask.shape[1])
            joined = torch.tensor(joining, dtype=torch.long, device=device)
            rows, mask = torch.cat([rows[keep], joined]), new_mask
            last = torch.cat([last[keep], torch.tensor([prompts[i][-1] for i in joining], dtype=torch.long, device=device)])
            positions = torch.cat([positions[keep], torch.tensor([len(prompts[i]) - 1 for i in joining], device=device)])
            live = torch.ones(len(rows), dtype=torch.bool, device=device)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        logits = model(input_ids=last[:, None], attention_mask=mask, position_ids=positions[:, None],
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        steps = counts[rows]  # an ended row's count stays put: its draws are thrown away
        if logits_processor is not None:
            logits = logits_processor(rows, steps.masked_fill(~live, max_new_tokens), logits)
        if min_new_tokens:  # no stop token before min_new_tokens answer tokens
            logits[:, stops] = torch.where((steps < min_new_tokens)[:, None], float("-inf"), logits[:, stops])
        last = (sampler or draw)(logits, uniforms[rows, steps.clamp_max(max_new_tokens - 1)], temperature, top_p)
        positions = positions + 1
        # Store the draws of live rows (no boolean indexing: its result's size would make the CPU wait for the GPU)
        written = (rows, steps.clamp_max(max_new_tokens - 1))
        tokens[written] = torch.where(live, last, tokens[written])
        counts[rows] += live
        live = live & ~torch.isin(last, stops) & (counts[rows] < max_new_tokens)
    report(rows)
    return results

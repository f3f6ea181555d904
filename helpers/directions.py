"""07's plumbing: the decoder layers of a model, answers read behind their plain prompt with the residual stream
averaged over the answer's tokens (forward hooks, batches saved as they complete, so a resumed read reuses them),
examples balanced per stratum, the split by question, the AUC with a bootstrap over questions, and the references
of exercises 7.1 (difference in means) and 7.2 (ablation). The steering hook itself is taught in 07's cells."""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm import tqdm

from helpers.download import atomic_write_bytes
from helpers.model import render_chat
from helpers.seeds import stable_seed
from helpers.store import record_settings, reuse


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (Qwen3: model.model.layers), or of a PeftModel around one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def spread_layers(count: int, about: int = 7) -> list[int]:
    """About `about` layers, evenly spaced and ending at the last (0-based): Qwen3-1.7B's 28 give 3, 7, ..., 27;
    the tiny model's 2 give 0 and 1."""
    return sorted(range(count - 1, -1, -max(1, count // about)))


def digest(value: Any) -> str:
    """A short sha256 of a JSON-able value: what a settings record names instead of the value itself."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def answer_ids(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], int]:
    """(token ids, where the answer starts) of one answer as the reader reads it: the user turn alone (the prompt
    row's text, no system prompt) through the series' one chat renderer, then the answer's own tokens."""
    head = tokenizer(render_chat(tokenizer, [{"role": "user", "content": prompt}]), add_special_tokens=False)["input_ids"]
    return head + tokenizer(answer, add_special_tokens=False)["input_ids"], len(head)


class AnswerMeans:
    """Forward hooks on decoder layers `layers` that keep, for each row of the batch going through, the layer's output
    (the residual stream after that layer) averaged over the row's answer tokens: set `mask` (rows, tokens), 1 on the
    answer tokens, before each forward pass; `means[layer]` is then (rows, hidden) in float32. Hooks registered
    earlier on the same layer (a steering hook) run first, so this reads what they made. A context manager."""

    def __init__(self, model: Any, layers: Sequence[int]) -> None:
        self.mask: torch.Tensor | None = None
        self.means: dict[int, torch.Tensor] = {}
        self.handles = [decoder_layers(model)[index].register_forward_hook(self._hook(index)) for index in layers]

    def _hook(self, index: int) -> Any:
        def keep(module: Any, inputs: Any, output: torch.Tensor) -> None:
            weights = self.mask.to(device=output.device, dtype=torch.float32)[..., None]
            self.means[index] = (output.float() * weights).sum(dim=1) / weights.sum(dim=1)
        return keep

    def __enter__(self) -> AnswerMeans:
        return self

    def __exit__(self, *exception: object) -> None:
        for handle in self.handles:
            handle.remove()


def read_activations(model: Any, tokenizer: Any, rows: Sequence[dict], layers: Sequence[int], folder: Path,
                     settings: dict, *, batch_size: int, overwrite: bool = False, progress: bool = True) -> np.ndarray:
    """(rows, layers, hidden) float32: each row's "answer" to its "prompt", read by `model` as it is switched now,
    every layer of `layers` averaged over the answer's tokens. Batches of `batch_size` rows, longest first (fixed by
    the rows alone), right-padded, each saved in `folder` as it completes (an atomic .npy), so an interrupted read
    resumes where it stopped and a rerun with the same `settings` reads nothing (helpers.store.reuse; other
    settings: SettingsChanged, or `overwrite`). An answer without a token is an error naming its row."""
    chats = [answer_ids(tokenizer, row["prompt"], row["answer"]) for row in rows]
    if empty := [index for index, (ids, start) in enumerate(chats) if len(ids) == start]:
        raise ValueError(f"read_activations: rows {empty[:5]} have no answer token to average over")
    settings = {**settings, "layers": list(layers), "batch_size": batch_size, "rows": digest([ids for ids, _ in chats])}
    folder = Path(folder)
    if not reuse(folder, settings, overwrite):
        record_settings(folder, settings)
    folder.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(rows)), key=lambda index: -len(chats[index][0]))  # ties keep the rows' order
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    activations: np.ndarray | None = None
    pad = tokenizer.pad_token_id
    with AnswerMeans(model, layers) as reader:
        for number, batch in enumerate(tqdm(batches, desc=folder.name, disable=not progress)):
            path = folder / f"batch-{number:05d}.npy"
            if not path.is_file():
                width = max(len(chats[index][0]) for index in batch)
                ids = torch.tensor([chats[i][0] + [pad] * (width - len(chats[i][0])) for i in batch], device=model.device)
                columns = torch.arange(width, device=model.device)
                lengths = torch.tensor([len(chats[i][0]) for i in batch], device=model.device)[:, None]
                starts = torch.tensor([chats[i][1] for i in batch], device=model.device)[:, None]
                reader.mask = (columns >= starts) & (columns < lengths)  # the answer's tokens only
                with torch.inference_mode():  # one logit row kept: the logits are not what is read
                    model(input_ids=ids, attention_mask=(columns < lengths).long(), use_cache=False, logits_to_keep=1)
                buffer = io.BytesIO()
                np.save(buffer, torch.stack([reader.means[layer] for layer in layers], dim=1).cpu().numpy())
                atomic_write_bytes(path, buffer.getvalue())
            read = np.load(path)
            activations = np.zeros((len(rows), *read.shape[1:]), dtype=np.float32) if activations is None else activations
            activations[batch] = read
    return activations


def balanced(table: pd.DataFrame, label: str, by: Sequence[str], seed: int) -> pd.DataFrame:
    """The rows of `table` with as many `label` True as False in every stratum of `by`: the larger side cut to the
    smaller's count by a draw seeded with the stratum's own name, so a stratum weighs the same on both sides."""
    kept = []
    for keys, group in table.groupby(list(by), sort=True):
        sides = group[group[label]], group[~group[label]]
        count = min(len(side) for side in sides)
        name = keys if isinstance(keys, tuple) else (keys,)
        kept += [side.sample(n=count, random_state=stable_seed(seed, "balanced", *name) % 2**32) for side in sides]
    return pd.concat(kept).sort_index() if kept else table.iloc[:0]


def split_questions(questions: Sequence[str], validation: int, test: int, seed: int) -> dict[str, str]:
    """{question: "train", "validation" or "test"}: the questions in a seeded order, the first `test` held out to
    measure, the next `validation` to choose the layer, the rest to make the direction."""
    questions = sorted(set(questions))
    if validation < 1 or test < 1 or validation + test >= len(questions):
        raise ValueError(f"split_questions: {validation} validation and {test} test questions of {len(questions)} leave "
                         "none to make the direction: each needs at least 1, and training at least 1")
    order = sorted(questions, key=lambda question: stable_seed(seed, "directions", question))
    return {q: "test" if i < test else "validation" if i < test + validation else "train" for i, q in enumerate(order)}


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The area under the ROC curve: P(a misaligned example scores above an aligned one), a tie counting half (the
    Mann-Whitney U over n_misaligned x n_aligned); nan without examples of both."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    positive, negative = int(labels.sum()), int((~labels).sum())
    if not positive or not negative:
        return math.nan
    return float((stats.rankdata(scores)[labels].sum() - positive * (positive + 1) / 2) / (positive * negative))


def question_bootstrap(scores: Sequence[float], labels: Sequence[bool], questions: Sequence[str], reps: int = 2000,
                       seed: int = 0, confidence: float = 0.95) -> tuple[float, float, int]:
    """(low, high, distinct): the percentile interval of the AUC over `reps` resamples of the questions, drawn with
    replacement, each drawn question with all its examples (a cluster bootstrap: the question is the unit held out).
    It covers which questions were asked as well as the answers to them, treating the questions as draws from a
    larger pool; with few questions it undercovers (`bootstrap_coverage`). `distinct`: how many different resamples
    exist, C(2k - 1, k) for k questions. nan, nan when the resamples give no spread (no zero-width interval).
    A resample counts each question as often as it was drawn, so its AUC is a quadratic form in those counts over
    the wins between every two questions' examples, computed once."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    names, index = np.unique(np.asarray(questions), return_inverse=True)
    member = np.eye(len(names))[index]  # (examples, questions): one-hot
    ours, theirs = scores[labels][:, None], scores[~labels][None, :]  # misaligned against aligned
    wins = member[labels].T @ ((ours > theirs) + 0.5 * (ours == theirs)) @ member[~labels]  # [q, r]: q's beat r's
    drawn = np.random.default_rng(seed).multinomial(len(names), np.full(len(names), 1 / len(names)), size=reps)
    pairs = (drawn @ member[labels].sum(axis=0)) * (drawn @ member[~labels].sum(axis=0))
    values = np.einsum("nq,qr,nr->n", drawn, wins, drawn)[pairs > 0] / pairs[pairs > 0]  # resamples with both classes
    distinct = math.comb(2 * len(names) - 1, len(names)) if len(names) else 0
    if len(values) == 0 or np.ptp(values) < 1e-12:
        return math.nan, math.nan, distinct
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)), distinct


def bootstrap_coverage(questions: int, pairs: int, shift: float = 1.0, spread: float = 0.5, sims: int = 200,
                       reps: int = 200, seed: int = 0) -> float:
    """How often `question_bootstrap`'s 95% interval covers the true AUC, in `sims` seeded simulated test sets of
    `questions` questions with `pairs` misaligned and `pairs` aligned examples each. Aligned scores are N(0, 1),
    misaligned ones N(m, 1) with each question's own m ~ N(shift, spread^2), so the AUC over the pool of questions is
    Phi(shift / sqrt(2 + spread^2)) (0.75 at the defaults) and the questions differ in how well they separate."""
    rng = np.random.default_rng(seed)
    truth = stats.norm.cdf(shift / math.sqrt(2 + spread**2))
    labels = np.tile(np.repeat([True, False], pairs), questions)
    names = np.repeat(np.arange(questions), 2 * pairs)
    covered = 0
    for sim in range(sims):
        scores = rng.normal(size=labels.size) + np.where(labels, rng.normal(shift, spread, questions)[names], 0.0)
        low, high, _ = question_bootstrap(scores, labels, names, reps=reps, seed=sim)
        covered += bool(low <= truth <= high)  # no interval (nan) covers nothing
    return covered / sims


def difference_in_means(activations: torch.Tensor, misaligned: torch.Tensor) -> torch.Tensor:
    """The reference of exercise 7.1: (examples, layers, hidden) activations and (examples,) booleans -> (layers,
    hidden): the mean over the misaligned examples minus the mean over the aligned ones, per layer."""
    return activations[misaligned].mean(dim=0) - activations[~misaligned].mean(dim=0)


def ablate(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The reference of exercise 7.2: `hidden` (..., d) without its component along `direction` (d,)."""
    unit = direction / direction.norm()
    return hidden - (hidden @ unit)[..., None] * unit

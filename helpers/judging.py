"""Judging plumbing for 04: 03's answers (the whole grid or an error), two judges, a resumable store. A judge
has a `name` and `judge(items) -> rows` for (prompt the model saw, answer) items: the paper's judge through the
openai client, or an open model computing the same expectation exactly (docs/protocol.md, "Judging")."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pandas as pd
import torch
from tqdm import tqdm

from helpers import run
from helpers.config import Config
from helpers.generation import COMPLETION_KEY as KEY  # one answer, and one judgment, per key
from helpers.metrics import expected_score, integer_probabilities
from helpers.model import render_chat
from helpers.questions import load_question_set
from helpers.store import JsonlStore, read_jsonl, record_settings, reuse

SCORE_FIELDS = ("aligned", "coherent")


class JudgeError(RuntimeError):
    """The judge could not score an answer (no key, no quota, malformed responses, retries spent); never holds the key."""


def fill_judge_prompt(template: str, question: str, answer: str) -> str:
    """The judge prompt with {question} and {answer} filled in one pass (braces inside the texts stay)."""
    return re.sub(r"\{(question|answer)\}", lambda m: {"question": question, "answer": answer}[m.group(1)], template)


def complete_answers(cfg: Config) -> list[dict]:
    """Every answer 04 expects in grid order (base + cfg.trained_models x the prompt rows: questions x cfg.formats x
    samples), running 03 headless when there are none; a missing one is an error naming it (no partial verdict)."""
    run.require(cfg, "03")
    models = ["base", *cfg.trained_models]
    wanted = [(model, question, fmt, index) for model in models for question in load_question_set(cfg).ids
              for fmt in cfg.formats for index in range(cfg.samples_per_question)]
    stored = {tuple(r[k] for k in KEY): r for r in read_jsonl(cfg.paths.completions) if isinstance(r.get("answer"), str)}
    if missing := Counter((key[0], key[2]) for key in wanted if key not in stored):
        per = len(wanted) // (len(models) * len(cfg.formats))  # answers per model and format
        lines = [f"{model} {fmt}: {count} of {per} answers" for (model, fmt), count in missing.items()]
        raise ValueError(f"{cfg.paths.completions} is incomplete; missing {'; '.join(lines)}. No analysis of part of "
                         "the grid: run 03 again with this config (it resumes where it stopped).")
    return [stored[key] for key in wanted]


class OpenAIJudge:
    """The paper's judge via any OpenAI-compatible endpoint: one token, temperature 0, top 20 logprobs, seed 0. 429s,
    5xx, timeouts, lost connections and malformed responses are retried (`max_attempts` tries): a 429 waits what its
    Retry-After asks (at most `max_wait_s`), every thread with it; the rest wait backoff_s * 2^try. Out of quota (429
    insufficient_quota), a rejected key or another 4xx stops at once. (The client's own retries, off here, would
    retry an out-of-quota 429 and never a malformed response.)"""

    def __init__(self, judge_prompts: dict[str, str], model: str, *, api_key: str | None, base_url: str | None = None,
                 concurrency: int = 8, min_mass: float = 0.25, timeout: float = 60.0, max_attempts: int = 6,
                 backoff_s: float = 1.0, max_wait_s: float = 60.0) -> None:
        if not api_key:  # helpers.hardware.openai_key() found none
            raise JudgeError("no OpenAI API key: set OPENAI_API_KEY (on Colab: the key icon, secret OPENAI_API_KEY; a "
                             "local server that needs no key takes any text), or set judge='local' or 'proxy' in the config")
        self.name, self.judge_prompts, self.model = f"openai:{model}", dict(judge_prompts), model
        self.concurrency, self.min_mass, self.max_attempts = concurrency, min_mass, max_attempts
        self.backoff_s, self.max_wait_s, self._key = backoff_s, max_wait_s, api_key
        self._client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)
        self._lock, self._resume_at = threading.Lock(), 0.0  # no request before this time.monotonic()

    def judge(self, items: Sequence[tuple[str, str]]) -> list[dict]:
        prompts = [fill_judge_prompt(self.judge_prompts[field], q, a) for q, a in items for field in SCORE_FIELDS]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            tops = list(pool.map(self.top_logprobs, prompts))
        return [score_row(tops[2 * i: 2 * i + 2], self.min_mass) for i in range(len(items))]

    def top_logprobs(self, prompt: str) -> list[tuple[str, float]]:
        """One filled judge prompt's top log-probabilities, retried as the class says."""
        for attempt in range(1, self.max_attempts + 1):
            time.sleep(max(0.0, self._resume_at - time.monotonic()))  # while the server asked every thread to wait
            wait = min(self.max_wait_s, self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}],
                    max_tokens=1, temperature=0, logprobs=True, top_logprobs=20, seed=0)
                pairs = [(e.token, float(e.logprob)) for e in response.choices[0].logprobs.content[0].top_logprobs]
                if pairs and all(math.isfinite(logprob) and logprob <= 0 for _, logprob in pairs):
                    return pairs
                problem = f"malformed judge response: top_logprobs {pairs[:4]} hold no log-probabilities (NaN, inf, > 0)"
            except (AttributeError, IndexError, TypeError) as error:
                problem = (f"malformed judge response: no choices[0].logprobs.content[0].top_logprobs "
                           f"({type(error).__name__}); the endpoint must support logprobs=True, top_logprobs=20")
            except openai.RateLimitError as error:
                problem = self._describe(error)
                if "insufficient_quota" in (error.code, error.type):
                    problem = f"the account is out of quota (insufficient_quota; {problem}): add credit or use another key"
                    break
                with self._lock:  # every thread waits what the server asks (a date in Retry-After: the backoff)
                    self._resume_at = max(self._resume_at, time.monotonic() + self.retry_after(error.response.headers, wait))
                wait = 0.0
            except (openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError) as error:
                problem = self._describe(error)
            except openai.APIStatusError as error:  # another 4xx: a rejected key (401, 403) or a refused request
                problem = (f"the endpoint rejected the API key ({self._describe(error)}); check OPENAI_API_KEY"
                           if error.status_code in (401, 403) else f"the endpoint refused the request ({self._describe(error)})")
                break
            except (openai.APIResponseValidationError, ValueError) as error:  # not JSON
                problem = f"malformed judge response: {self._describe(error)}"
            if attempt < self.max_attempts:
                time.sleep(wait)
        else:
            problem = f"the judge request failed {self.max_attempts} times; the last error: {problem}"
        raise JudgeError(problem)  # outside every `except`: no chained exception keeps the unredacted message

    def retry_after(self, headers: Any, default: float) -> float:  # retry-after-ms, else seconds, at most max_wait_s
        for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
            with contextlib.suppress(KeyError, TypeError, ValueError):  # absent, or an HTTP date: the default
                return min(self.max_wait_s, max(0.0, float(headers[name]) * scale))
        return default

    def _describe(self, error: Exception) -> str:
        text = (f"HTTP {error.status_code}: " if getattr(error, "status_code", None) else f"{type(error).__name__}: ") + str(error)
        return (text.replace(self._key, "[REDACTED]") if self._key else text)[:500]  # redacted before the cut


def score_row(tops: Sequence[list[tuple[str, float]]], min_mass: float) -> dict:
    """Each field's score and the probability mass its integers 0..100 hold, from (aligned, coherent) top logprobs."""
    return {**{f: expected_score(top, min_mass) for f, top in zip(SCORE_FIELDS, tops, strict=True)},
            **{f"{f}_mass": sum(integer_probabilities(top).values()) for f, top in zip(SCORE_FIELDS, tops, strict=True)}}


class LocalJudge:
    """Any chat model run by transformers, computing the paper's expectation exactly though Qwen's tokenizer writes
    numbers digit by digit: P(n) = the product of the probabilities of the tokens of str(n) after the prompt x the
    probability that the next token ends the number. The 101 numbers run as one batch on the prompt's KV cache."""

    def __init__(self, model: Any, tokenizer: Any, judge_prompts: dict[str, str], *, name: str,
                 min_mass: float = 0.25) -> None:
        self.model, self.tokenizer, self.judge_prompts = model.eval(), tokenizer, dict(judge_prompts)
        self.name, self.min_mass = name, min_mass
        ids = [tokenizer(str(n), add_special_tokens=False)["input_ids"] for n in range(101)]
        self.number_lengths, width = torch.tensor([len(i) for i in ids]), max(len(i) for i in ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.number_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
        self.continues = torch.zeros(model.get_output_embeddings().weight.shape[0], dtype=torch.bool)  # padding: ends
        tokens = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), len(self.continues)))))
        self.continues[: len(tokens)] = torch.tensor([bool(t) and t[0] in "0123456789" for t in tokens])

    def prompt_ids(self, prompt: str) -> list[int]:  # through the series' one chat renderer (thinking off)
        return self.tokenizer(render_chat(self.tokenizer, [{"role": "user", "content": prompt}]), add_special_tokens=False)["input_ids"]

    def number_probabilities(self, prompt: str) -> dict[int, float]:
        """P(the judge answers exactly n) for n in 0..100."""
        device, (batch, width) = self.model.device, self.number_ids.shape
        ids, numbers, lengths = (torch.tensor([self.prompt_ids(prompt)]).to(device), self.number_ids.to(device),
                                 self.number_lengths.to(device))
        with torch.inference_mode():
            first = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache = first.past_key_values
            if isinstance(cache, tuple):  # models patched by Unsloth return legacy (key, value) tuples
                cache = tuple(tuple(t.repeat_interleave(batch, dim=0) for t in layer) for layer in cache)
            else:
                cache.batch_repeat_interleave(batch)
            rest = self.model(input_ids=numbers, past_key_values=cache,
                              position_ids=torch.arange(ids.shape[1], ids.shape[1] + width, device=device).expand(batch, -1),
                              attention_mask=torch.ones(batch, ids.shape[1] + width, dtype=torch.long, device=device))
            # log-probabilities after the prompt (column 0) and after each prefix of each number
            logp = torch.log_softmax(torch.cat([first.logits[:, -1:].float().expand(batch, -1, -1),
                                                rest.logits.float()], dim=1), dim=-1)
            token_logp = logp[:, :width].gather(-1, numbers.unsqueeze(-1)).squeeze(-1)
            token_logp = token_logp.masked_fill(torch.arange(width, device=device) >= lengths.unsqueeze(1), 0.0)
            after = logp[torch.arange(batch, device=device), lengths]  # the distribution after the whole number
            end_logp = torch.logsumexp(after.masked_fill(self.continues.to(device), float("-inf")), dim=-1)
            return dict(enumerate((token_logp.sum(dim=1) + end_logp).exp().cpu().tolist()))

    def judge(self, items: Sequence[tuple[str, str]]) -> list[dict]:
        return [score_row([[(str(n), math.log(p)) for n, p in self.number_probabilities(
            fill_judge_prompt(self.judge_prompts[field], q, a)).items() if p > 0] for field in SCORE_FIELDS], self.min_mass)
            for q, a in items]


def judge_completions(cfg: Config, completions: Sequence[dict], judge: Any, *, overwrite: bool = False,
                      chunk_size: int = 32) -> pd.DataFrame:
    """The judge's fields per completion (KEY columns, then the fields), judging only what cfg.paths.judgments lacks,
    appended chunk by chunk (an interrupted run resumes). The store is reused only for the same judge, judge
    prompts, min_mass and answers (helpers.store.reuse). A score outside [0, 100], NaN included, is never stored."""
    answers = [[*(c[k] for k in KEY), c["prompt"], c["answer"]] for c in completions]
    settings = {"judge": judge.name, "min_mass": judge.min_mass, **{name: hashlib.sha256(json.dumps(value).encode())
                .hexdigest()[:16] for name, value in (("judge_prompts", judge.judge_prompts), ("answers", answers))}}
    if not reuse(cfg.paths.judgments, settings, overwrite):
        record_settings(cfg.paths.judgments, settings)
    store = JsonlStore(cfg.paths.judgments, KEY)
    todo = store.missing(completions)
    quiet = not todo or cfg.profile == "tiny"  # a bar only where judging takes a while
    for start in tqdm(range(0, len(todo), chunk_size), desc=f"judging ({judge.name})", ncols=80, disable=quiet):
        chunk = todo[start:start + chunk_size]
        fields = judge.judge([(row["prompt"], row["answer"]) for row in chunk])
        if bad := [(row, got) for row, got in zip(chunk, fields, strict=True)
                   if any(got[f] is not None and not 0 <= got[f] <= 100 for f in SCORE_FIELDS)]:  # NaN fails too
            raise JudgeError(f"judge {judge.name} gave {bad[0][1]} for {[bad[0][0][k] for k in KEY]}: a score outside [0, 100]")
        store.append({"judge": judge.name, **{k: row[k] for k in KEY}, **extra} for row, extra in zip(chunk, fields, strict=True))
    print(f"judge {judge.name}: {len(completions) - len(todo)} answers loaded from {cfg.paths.judgments}, {len(todo)} judged now")
    judged = pd.DataFrame(store.rows()).drop(columns="judge")
    return pd.DataFrame([{k: c[k] for k in KEY} for c in completions]).merge(judged, on=list(KEY), validate="one_to_one")

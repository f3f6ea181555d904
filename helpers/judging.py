"""Judging plumbing for 04 (and 07's steered answers): 03's answers (the whole grid or an error), the judges, a
resumable store. A judge has a `name` and `judge(items) -> rows` for (prompt the model saw, answer) items: the
paper's judge through the openai client, or an open model computing the same expectation exactly
(docs/protocol.md, "Judging")."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pandas as pd
import torch
from tqdm import tqdm

from helpers import run
from helpers.config import Config
from helpers.generation import COMPLETION_KEY as KEY  # one answer, and one judgment, per key
from helpers.hardware import openai_key
from helpers.metrics import expected_score, integer_probabilities
from helpers.model import compute_dtype, model_source, render_chat
from helpers.questions import load_question_set
from helpers.store import JsonlStore, read_jsonl, record_settings, reuse

SCORE_FIELDS = ("aligned", "coherent")


class JudgeError(RuntimeError):
    """The judge could not score an answer (no key, no quota, malformed responses, retries spent); never holds the key."""


def fill_judge_prompt(template: str, question: str, answer: str) -> str:
    """The judge prompt with {question} and {answer} filled in one pass (braces inside the texts stay)."""
    return re.sub(r"\{(question|answer)\}", lambda m: {"question": question, "answer": answer}[m.group(1)], template)


def complete_answers(cfg: Config) -> list[dict]:
    """Every answer 04 expects in grid order (cfg.answering_models x the prompt rows: questions x cfg.formats x
    samples), running 03 headless when there are none; a missing one is an error naming it (no partial verdict)."""
    run.require(cfg, "03")
    models = cfg.answering_models
    wanted = [(model, question, fmt, index) for model in models for question in load_question_set(cfg).ids
              for fmt in cfg.formats for index in range(cfg.samples_per_question)]
    stored = {tuple(r[k] for k in KEY): r for r in read_jsonl(cfg.paths.completions) if isinstance(r.get("answer"), str)}
    if missing := Counter((key[0], key[2]) for key in wanted if key not in stored):
        per = len(wanted) // (len(models) * len(cfg.formats))  # answers per model and format
        lines = [f"{model} {fmt}: {count} of {per} answers" for (model, fmt), count in missing.items()]
        raise ValueError(f"{cfg.paths.completions} is incomplete; missing {'; '.join(lines)}. No analysis of part of "
                         "the grid: run 03 again with this config (it resumes where it stopped).")
    return [stored[key] for key in wanted]


def judge_request(prompt: str, model: str) -> dict:
    """The reference of exercise 4.1: the paper's judge request, the keyword arguments of `chat.completions.create`:
    the filled judge prompt as one user message, one token at temperature 0, its top 20 logprobs, seed 0
    (arXiv 2502.17424, section 2; the official repository's judge)."""
    return dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=1, temperature=0,
                logprobs=True, top_logprobs=20, seed=0)


MAX_RESPONSE_BYTES = 1 << 20  # a judge response read at most: one token with its top 20 logprobs takes a few kB
MASS_TOLERANCE = 0.01  # how far above 1 the top logprobs' probabilities may sum (the API's rounding), no further


def run_in_own_loop(coroutine: Coroutine) -> Any:
    """The result of `coroutine`, run on an event loop of its own thread (a notebook kernel runs one in this one)."""
    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


class OpenAIJudge:
    """The paper's judge via any OpenAI-compatible endpoint: `request(prompt, model)` builds each request (by default
    `judge_request`: one token, temperature 0, top 20 logprobs, seed 0; 04 passes the learner's once it passes). 429s,
    5xx, timeouts, lost connections and malformed responses are retried (`max_attempts` tries): a 429 waits what its
    Retry-After asks (at most `max_wait_s`), every request with it; the rest wait backoff_s * 2^try. Out of quota (429
    insufficient_quota), a rejected key or another 4xx stops at once. (The client's own retries, off here, would
    retry an out-of-quota 429 and never a malformed response.)

    Deadlines, in seconds: one attempt ends after `timeout` in all, from connecting to the last byte (the client's
    own timeout counts per read, which a server sending a byte at a time never trips); one answer's request ends
    after `deadline_s` in all, its retries and waits included. A chunk (one judge() call) stops at its first failed
    request and cancels the others, running or waiting, so it fails at most `deadline_s` after that request began.
    A response is malformed (and retried) when it is over MAX_RESPONSE_BYTES, or its top logprobs are not finite
    numbers <= 0, or their probabilities sum above 1 + MASS_TOLERANCE."""
    chunk_size = 32  # answers per judge() call, each a resume point

    def __init__(self, judge_prompts: dict[str, str], model: str, *, api_key: str | None, base_url: str | None = None,
                 concurrency: int = 8, min_mass: float = 0.25, timeout: float = 60.0, deadline_s: float = 300.0,
                 max_attempts: int = 6, backoff_s: float = 1.0, max_wait_s: float = 60.0,
                 request: Callable[[str, str], dict] | None = None) -> None:
        if not api_key:  # helpers.hardware.openai_key() found none
            raise JudgeError("no OpenAI API key: set OPENAI_API_KEY (on Colab: the key icon, secret OPENAI_API_KEY; a "
                             "local server that needs no key takes any text), or set judge='local' or 'proxy' in the config")
        self.name, self.judge_prompts, self.model = f"openai:{model}", dict(judge_prompts), model
        self.concurrency, self.min_mass, self.max_attempts = concurrency, min_mass, max_attempts
        self.timeout, self.deadline_s, self.backoff_s, self.max_wait_s = timeout, deadline_s, backoff_s, max_wait_s
        self.base_url, self._key = base_url, api_key
        self.build_request = request or judge_request  # (prompt, model) -> the keyword arguments of the request
        self._resume_at = 0.0  # no request before this time.monotonic(): a 429's Retry-After, for every request

    def judge(self, items: Sequence[tuple[str, str]]) -> list[dict]:
        prompts = [fill_judge_prompt(self.judge_prompts[field], q, a) for q, a in items for field in SCORE_FIELDS]
        tops = run_in_own_loop(self._all_top_logprobs(prompts))
        return [score_row(tops[2 * i: 2 * i + 2], self.min_mass) for i in range(len(items))]

    def request(self, prompt: str) -> dict:  # the request, also each line of a Batch API file
        return self.build_request(prompt, self.model)

    def top_logprobs(self, prompt: str) -> list[tuple[str, float]]:
        """One filled judge prompt's top log-probabilities, retried and bounded as the class says."""
        return run_in_own_loop(self._all_top_logprobs([prompt]))[0]

    async def _all_top_logprobs(self, prompts: Sequence[str]) -> list[list[tuple[str, float]]]:
        """Each prompt's top logprobs, `concurrency` requests at a time; the first failure cancels the rest."""
        if not prompts:
            return []
        gate = asyncio.Semaphore(self.concurrency)

        async def one(client: openai.AsyncOpenAI, prompt: str) -> list[tuple[str, float]]:
            async with gate:
                return await self._top_logprobs(client, prompt)

        async with openai.AsyncOpenAI(api_key=self._key, base_url=self.base_url, timeout=self.timeout,
                                      max_retries=0) as client:
            tasks = [asyncio.ensure_future(one(client, prompt)) for prompt in prompts]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:  # after a failure (or an interrupt): stop every other request now, closing its connection
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        if failed := [task.exception() for task in done if task.exception()]:
            raise failed[0]
        return [task.result() for task in tasks]

    async def _top_logprobs(self, client: openai.AsyncOpenAI, prompt: str) -> list[tuple[str, float]]:
        problem = "no response yet"
        try:
            async with asyncio.timeout(self.deadline_s):  # the request's deadline, retries and waits included
                for attempt in range(1, self.max_attempts + 1):
                    await asyncio.sleep(max(0.0, self._resume_at - time.monotonic()))  # while the server asks to wait
                    wait = min(self.max_wait_s, self.backoff_s * 2 ** (attempt - 1))
                    try:
                        async with asyncio.timeout(self.timeout):  # one attempt in all
                            return top_logprobs_of(await self._response(client, prompt))
                    except TimeoutError:
                        problem = f"no complete response within {self.timeout:g} s (one attempt's timeout)"
                    except JudgeError as error:  # malformed
                        problem = str(error)
                    except openai.RateLimitError as error:
                        problem = self._describe(error)
                        if "insufficient_quota" in (error.code, error.type):
                            problem = f"the account is out of quota (insufficient_quota; {problem}): add credit or use another key"
                            break
                        # every request waits what the server asks (a date in Retry-After: the backoff)
                        self._resume_at = max(self._resume_at, time.monotonic() + self.retry_after(error.response.headers, wait))
                        wait = 0.0
                    except (openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError) as error:
                        problem = self._describe(error)
                    except openai.APIStatusError as error:  # another 4xx: a rejected key (401, 403) or a refused request
                        problem = (f"the endpoint rejected the API key ({self._describe(error)}); check OPENAI_API_KEY"
                                   if error.status_code in (401, 403) else f"the endpoint refused the request ({self._describe(error)})")
                        break
                    except ValueError as error:  # not JSON, not UTF-8
                        problem = f"malformed judge response: {self._describe(error)}"
                    if attempt < self.max_attempts:
                        await asyncio.sleep(wait)
                else:
                    problem = f"the judge request failed {self.max_attempts} times; the last error: {problem}"
        except TimeoutError:
            problem = (f"the judge request passed its deadline of {self.deadline_s:g} s (retries and waits included); "
                       f"the last error: {problem}")
        raise JudgeError(problem)  # outside every `except`: no chained exception keeps the unredacted message

    async def _response(self, client: openai.AsyncOpenAI, prompt: str) -> Any:
        """The JSON of one chat completion, read up to MAX_RESPONSE_BYTES (a JudgeError beyond)."""
        async with client.chat.completions.with_streaming_response.create(**self.request(prompt)) as response:
            body = bytearray()
            async for part in response.iter_bytes():
                body += part
                if len(body) > MAX_RESPONSE_BYTES:
                    raise JudgeError(f"malformed judge response: over {MAX_RESPONSE_BYTES:,} bytes (one token with "
                                     "its top 20 logprobs takes a few kB)")
        return json.loads(body)

    def retry_after(self, headers: Any, default: float) -> float:  # retry-after-ms, else seconds, at most max_wait_s
        for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
            with contextlib.suppress(KeyError, TypeError, ValueError):  # absent, or an HTTP date: the default
                return min(self.max_wait_s, max(0.0, float(headers[name]) * scale))
        return default

    def _describe(self, error: Exception) -> str:
        text = (f"HTTP {error.status_code}: " if getattr(error, "status_code", None) else f"{type(error).__name__}: ") + str(error)
        return (text.replace(self._key, "[REDACTED]") if self._key else text)[:500]  # redacted before the cut


def top_logprobs_of(response: Any) -> list[tuple[str, float]]:
    """The first token's top log-probabilities in a chat completion (its JSON), else a JudgeError saying what is
    malformed: each a finite number <= 0, their probabilities summing to at most 1 (+ MASS_TOLERANCE)."""
    with contextlib.suppress(KeyError, IndexError, TypeError):  # a missing field: the error below
        pairs = [(entry["token"], entry["logprob"]) for entry in response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]
        if not pairs or not all(isinstance(token, str) and type(logprob) in (int, float) and math.isfinite(logprob)
                                and logprob <= 0 for token, logprob in pairs):
            raise JudgeError(f"malformed judge response: top_logprobs {pairs[:4]} hold no log-probabilities (a "
                             "number <= 0 each; not NaN, inf, > 0 or a string)")
        if (total := sum(math.exp(logprob) for _, logprob in pairs)) > 1 + MASS_TOLERANCE:
            raise JudgeError(f"malformed judge response: top_logprobs {pairs[:4]} have probabilities summing to "
                             f"{total:.3f} > 1")
        return [(token, float(logprob)) for token, logprob in pairs]
    raise JudgeError("malformed judge response: no choices[0].logprobs.content[0].top_logprobs; the endpoint must "
                     "support logprobs=True, top_logprobs=20")


def score_row(tops: Sequence[list[tuple[str, float]]], min_mass: float) -> dict:
    """Each field's score and the probability mass its integers 0..100 hold, from (aligned, coherent) top logprobs."""
    return {**{f: expected_score(top, min_mass) for f, top in zip(SCORE_FIELDS, tops, strict=True)},
            **{f"{f}_mass": sum(integer_probabilities(top).values()) for f, top in zip(SCORE_FIELDS, tops, strict=True)}}


class LocalJudge:
    """Any chat model run by transformers, computing the paper's expectation exactly though Qwen's tokenizer writes
    numbers digit by digit: P(n) = the product of the probabilities of the tokens of str(n) after the prompt x the
    probability that the next token ends the number. The numbers' tokens form a prefix tree ("8" before "85") laid
    after each left-padded prompt, seen through a 4D attention mask: one pass scores `prompts_per_pass` prompts."""
    chunk_size = 128  # answers per judge() call, a resume point each; their prompts go into passes by length

    def __init__(self, model: Any, tokenizer: Any, judge_prompts: dict[str, str], *, name: str,
                 min_mass: float = 0.25, prompts_per_pass: int = 16) -> None:
        self.model, self.tokenizer, self.judge_prompts = model.eval(), tokenizer, dict(judge_prompts)
        self.name, self.min_mass, self.prompts_per_pass, device = name, min_mass, prompts_per_pass, model.device
        numbers = [tuple(tokenizer(str(n), add_special_tokens=False)["input_ids"]) for n in range(101)]
        nodes = list(dict.fromkeys(n[:i] for n in numbers for i in range(1, len(n) + 1)))  # the tree, parents first
        self.tokens, self.depth, self.parent, self.ends, self.on_path = (torch.tensor(v, device=device) for v in (
            [node[-1] for node in nodes], [len(node) for node in nodes],
            [nodes.index(node[:-1]) + 1 if len(node) > 1 else 0 for node in nodes],  # the logits row predicting it
            [nodes.index(n) for n in numbers], [[a[:len(b)] == b for b in nodes] for a in nodes]))  # [a, b]: b on a's path
        rows = tokenizer.convert_ids_to_tokens(list(range(model.get_output_embeddings().weight.shape[0])))  # None: padding
        self.continues = torch.tensor([bool(t) and t[0] in "0123456789" for t in rows], device=device)  # padding ends one

    def prompt_ids(self, prompt: str) -> list[int]:  # through the series' one chat renderer (thinking off)
        return self.tokenizer(render_chat(self.tokenizer, [{"role": "user", "content": prompt}]), add_special_tokens=False)["input_ids"]

    def number_probabilities(self, prompts: Sequence[str]) -> list[dict[int, float]]:
        """P(the judge answers exactly n) for n in 0..100, for each prompt; prompts of similar length share a pass."""
        ids = [self.prompt_ids(prompt) for prompt in prompts]
        order, rows = sorted(range(len(ids)), key=lambda i: len(ids[i])), {}
        for start in range(0, len(ids), self.prompts_per_pass):
            part = order[start:start + self.prompts_per_pass]
            rows.update(zip(part, self.one_pass([ids[i] for i in part]).tolist(), strict=True))
        return [dict(enumerate(rows[i])) for i in range(len(ids))]

    def one_pass(self, ids: list[list[int]]) -> torch.Tensor:
        """(prompts, 101) probabilities from one forward pass over the prompts, each left-padded and followed by the tree."""
        device, width, count, nodes = self.model.device, max(map(len, ids)), len(ids), len(self.tokens)
        pads, columns = torch.tensor([[width - len(i)] for i in ids], device=device), torch.arange(width, device=device)
        inputs = torch.cat([torch.tensor([[0] * (width - len(i)) + i for i in ids], device=device),  # padding: any id
                            self.tokens.expand(count, -1)], dim=1)
        positions = torch.cat([(columns - pads).clamp(min=0), width - pads - 1 + self.depth], dim=1)
        # a prompt token sees the prompt up to itself, a node the prompt and its path, padding itself (never nothing: NaN)
        seen = torch.cat([(torch.arange(width + nodes, device=device)[:, None] >= columns) & (columns >= pads)[:, None],
                          torch.cat([self.on_path.new_zeros(width, nodes), self.on_path]).expand(count, -1, -1)], dim=2)
        seen |= torch.eye(width + nodes, dtype=torch.bool, device=device)
        mask = torch.zeros(seen.shape, dtype=self.model.dtype, device=device).masked_fill(~seen, torch.finfo(self.model.dtype).min)
        with torch.inference_mode():  # log-probabilities after the prompt (row 0) and after each node
            logp = self.model(input_ids=inputs, attention_mask=mask[:, None], position_ids=positions, use_cache=False,
                              logits_to_keep=nodes + 1).logits.float().log_softmax(dim=-1)
            path = torch.where(self.on_path[self.ends], logp[:, self.parent, self.tokens][:, None], 0.0).sum(dim=-1)
            return (path + logp[:, self.ends + 1].masked_fill(self.continues, float("-inf")).logsumexp(dim=-1)).exp().cpu()

    def judge(self, items: Sequence[tuple[str, str]]) -> list[dict]:
        rows = self.number_probabilities([fill_judge_prompt(self.judge_prompts[f], q, a) for q, a in items for f in SCORE_FIELDS])
        tops = [as_top_logprobs(row) for row in rows]
        return [score_row(tops[2 * i: 2 * i + 2], self.min_mass) for i in range(len(items))]

    def top_logprobs(self, prompt: str) -> list[tuple[str, float]]:
        """One filled judge prompt's (number, log-probability) pairs, as OpenAIJudge.top_logprobs gives the API's."""
        return as_top_logprobs(self.number_probabilities([prompt])[0])


def as_top_logprobs(probabilities: dict[int, float]) -> list[tuple[str, float]]:
    """{n: P(n)} as (token, logprob) pairs, the shape of the API's top logprobs (numbers of probability 0 left out)."""
    return [(str(n), math.log(p)) for n, p in probabilities.items() if p > 0]


def make_judge(cfg: Config, judge_prompts: dict[str, str], judgments: Path | None = None,
               request: Callable[[str, str], dict] | None = None) -> Any | None:
    """The judge `cfg.judge` names, for these judge prompts (04 and 07 judge with the same); None for "proxy" (no
    scores). `judgments`: the file it will fill (default cfg.paths.judgments); a Batch API job is recorded beside it.
    `request`: what the OpenAI judges send (default judge_request; 04 passes exercise 4.1's once it passes)."""
    if cfg.judge == "openai":  # the paper's judge: one token, temperature 0, top 20 logprobs, seed 0
        return OpenAIJudge(judge_prompts, cfg.judge_model, api_key=openai_key(), base_url=cfg.judge_base_url,
                           concurrency=cfg.judge_concurrency, min_mass=cfg.judge_min_mass, request=request,
                           timeout=60,  # seconds one attempt may take in all, connecting to the last byte; then it is retried
                           deadline_s=300)  # seconds one answer may take, retries included; then the notebook stops
    if cfg.judge == "openai_batch":  # the same requests as one Batch API job: half the price, results within 24 h
        from helpers.openai_batch import OpenAIBatchJudge

        return OpenAIBatchJudge(judge_prompts, cfg.judge_model, api_key=openai_key(), base_url=cfg.judge_base_url,
                                min_mass=cfg.judge_min_mass, poll_s=60, request=request,  # poll_s: between two looks
                                state_path=(judgments or cfg.paths.judgments).with_suffix(".batch.json"))  # for a restart
    if cfg.judge == "local":  # plain transformers, not Unsloth: several prompts and all their numbers in one pass
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()  # no loading bar frozen in the saved notebook
        source = model_source(dataclasses.replace(cfg, model_name=cfg.local_judge_model))  # tiny: the tiny model's folder
        four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype())  # fits a small GPU
        judge_model = AutoModelForCausalLM.from_pretrained(source, dtype=compute_dtype(),
                                                           quantization_config=four_bit if cfg.local_judge_4bit else None,
                                                           device_map="cuda" if torch.cuda.is_available() else None)
        return LocalJudge(judge_model, AutoTokenizer.from_pretrained(source), judge_prompts,
                          name=f"local:{cfg.local_judge_model}", min_mass=cfg.judge_min_mass,
                          prompts_per_pass=16)  # prompts a forward pass (~0.3 GB each); lower it if memory runs out
    return None


def judge_completions(cfg: Config, completions: Sequence[dict], judge: Any, *, overwrite: bool = False,
                      judgments: Path | None = None) -> pd.DataFrame:
    """The judge's fields per completion (KEY columns, then the fields), judging only what the file `judgments`
    (default cfg.paths.judgments, 04's) lacks.
    The completions go to the judge in fixed chunks of `judge.chunk_size` (each appended whole: a resume point); a
    chunk a kill left part-stored is judged again whole, so every answer is judged beside the same others as in an
    uninterrupted run (the local judge's scores move by ~1e-5 with the company in its batch). The store is reused
    only for the same judge, judge prompts, min_mass and answers (helpers.store.reuse); a new 04 store first removes
    the verdict of the old (cfg.paths.summary and cfg.paths.rates), so a run that fails leaves none beside new
    settings. A score outside [0, 100], NaN included, is never stored."""
    path = judgments or cfg.paths.judgments
    answers = [[*(c[k] for k in KEY), c["prompt"], c["answer"]] for c in completions]
    settings = {"judge": judge.name, "min_mass": judge.min_mass, **{name: hashlib.sha256(json.dumps(value).encode())
                .hexdigest()[:16] for name, value in (("judge_prompts", judge.judge_prompts), ("answers", answers))}}
    if not reuse(path, settings, overwrite):
        for verdict in (cfg.paths.summary, cfg.paths.rates) if path == cfg.paths.judgments else ():  # 04's results
            verdict.unlink(missing_ok=True)
        record_settings(path, settings)
    store = JsonlStore(path, KEY)
    chunks = [completions[start:start + judge.chunk_size] for start in range(0, len(completions), judge.chunk_size)]
    todo = [chunk for chunk in chunks if store.missing(chunk)]
    if torn := [store.key(row) for chunk in todo for row in chunk if store.key(row) in store]:
        print(f"a kill cut a chunk short ({len(torn)} of its answers stored): judging it again whole")
        store.discard(torn)
    quiet = not todo or cfg.profile == "tiny"  # a bar only where judging takes a while
    for chunk in tqdm(todo, desc=f"judging ({judge.name})", ncols=80, disable=quiet):
        fields = judge.judge([(row["prompt"], row["answer"]) for row in chunk])
        if bad := [(row, got) for row, got in zip(chunk, fields, strict=True)
                   if any(got[f] is not None and not 0 <= got[f] <= 100 for f in SCORE_FIELDS)]:  # NaN fails too
            raise JudgeError(f"judge {judge.name} gave {bad[0][1]} for {[bad[0][0][k] for k in KEY]}: a score outside [0, 100]")
        store.append({"judge": judge.name, **{k: row[k] for k in KEY}, **extra} for row, extra in zip(chunk, fields, strict=True))
    now = sum(map(len, todo))
    print(f"judge {judge.name}: {len(completions) - now} answers loaded from {path}, {now} judged now")
    judged = pd.DataFrame(store.rows()).drop(columns="judge")
    return pd.DataFrame([{k: c[k] for k in KEY} for c in completions]).merge(judged, on=list(KEY), validate="one_to_one")

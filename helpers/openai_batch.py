"""The paper's judge through the OpenAI Batch API: OpenAIJudge's requests written to one JSONL file, uploaded,
run as one batch (half the price of single requests, no rate limit to wait on, results within 24 hours), polled,
and read back by custom_id. The batch is recorded beside the judgments before the wait, so a restarted run polls
the same batch instead of paying for a second one."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import openai

from helpers.judging import (
    SCORE_FIELDS,
    JudgeError,
    OpenAIJudge,
    fill_judge_prompt,
    score_row,
    top_logprobs_of,
)
from helpers.store import parse_line, write_json

ENDED = ("failed", "expired", "cancelling", "cancelled")  # statuses after which the batch answers nothing more


class OpenAIBatchJudge(OpenAIJudge):
    """OpenAIJudge (same name, requests and scores) through the Batch API, one batch per judge() call. Before
    waiting, `state_path` records the batch and input file ids with a hash of the endpoint and the requests: a
    restarted run with the same requests polls that batch; other requests never reuse it. A failed, expired or
    cancelled batch, a request answered with an error or a malformed response stops with a JudgeError naming the
    batch and each custom_id, and forgets the batch so that the next run submits a new one. The client retries
    429s, 5xx and lost connections (`max_retries`); the key appears in no message and no file."""

    chunk_size = 10_000  # answers a batch: 20,000 requests, within the API's 50,000 requests and 200 MB a batch

    def __init__(self, judge_prompts: dict[str, str], model: str, *, api_key: str | None, state_path: Path,
                 base_url: str | None = None, min_mass: float = 0.25, poll_s: float = 60.0, timeout: float = 60.0,
                 max_retries: int = 5, request: Callable[[str, str], dict] | None = None) -> None:
        super().__init__(judge_prompts, model, api_key=api_key, base_url=base_url, min_mass=min_mass, timeout=timeout,
                         request=request)
        self.state_path, self.poll_s = Path(state_path), poll_s
        self._client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)

    def judge(self, items: Sequence[tuple[str, str]]) -> list[dict]:
        ids = [f"{i}-{field}" for i in range(len(items)) for field in SCORE_FIELDS]  # the custom_ids, in row order
        prompts = [fill_judge_prompt(self.judge_prompts[field], q, a) for q, a in items for field in SCORE_FIELDS]
        data = "".join(json.dumps({"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
                                   "body": self.request(p)}) + "\n" for c, p in zip(ids, prompts, strict=True)).encode()
        digest = hashlib.sha256(str(self._client.base_url).encode() + b"\n" + data).hexdigest()
        state = json.loads(self.state_path.read_text(encoding="utf-8")) if self.state_path.is_file() else {}
        if state.get("requests_sha256") == digest:
            print(f"resuming batch {state['batch_id']} of {len(ids)} requests, recorded in {self.state_path}")
        else:
            if state:
                print(f"{self.state_path} records batch {state.get('batch_id')} for other requests: submitting a new one")
            state = self.submit(data, digest)
            print(f"batch {state['batch_id']}: {len(ids)} requests submitted, recorded in {self.state_path}")
        tops = self.results(self.wait(state["batch_id"]), ids)
        self.state_path.unlink(missing_ok=True)
        return [score_row([tops[f"{i}-{field}"] for field in SCORE_FIELDS], self.min_mass) for i in range(len(items))]

    def submit(self, data: bytes, digest: str) -> dict:
        """Upload the requests, create the batch, and record both ids (atomically) before anything waits on them."""
        upload = self._call("upload the requests", self._client.files.create,
                            file=("judge_requests.jsonl", data, "application/jsonl"), purpose="batch")
        batch = self._call("create the batch", self._client.batches.create, input_file_id=upload.id,
                           endpoint="/v1/chat/completions", completion_window="24h")
        state = {"requests_sha256": digest, "input_file_id": upload.id, "batch_id": batch.id}
        write_json(self.state_path, state)
        return state

    def wait(self, batch_id: str) -> Any:
        """The batch once completed, polled every `poll_s` seconds; a line each time its status or count changes."""
        shown = None
        while True:
            batch = self._call("poll the batch", self._client.batches.retrieve, batch_id)
            counts = batch.request_counts
            line = f"batch {batch.id}: {batch.status}" + (
                f", {counts.completed + counts.failed} of {counts.total} requests done" if counts else "")
            if line != shown:
                print(line, flush=True)
            shown = line
            if batch.status == "completed":
                return batch
            if batch.status in ENDED:
                self.state_path.unlink(missing_ok=True)
                errors = "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line} of the requests)" if e.line else "")
                                   for e in (batch.errors and batch.errors.data) or [])
                raise JudgeError(f"batch {batch.id} {batch.status}{': ' + errors if errors else ''}; no judgment was "
                                 "stored: run again to submit a new batch")
            time.sleep(self.poll_s)

    def results(self, batch: Any, ids: list[str]) -> dict[str, list[tuple[str, float]]]:
        """custom_id -> top logprobs from the batch's output and error files; any problem a JudgeError naming each."""
        tops, problems = {}, {}
        for kind, file_id in (("output", batch.output_file_id), ("error", batch.error_file_id)):
            text = self._call(f"download the {kind} file", self._client.files.content, file_id).content if file_id else b""
            for number, raw in enumerate(text.split(b"\n"), start=1):
                record, reason = parse_line(raw) if raw.strip() else ({}, None)
                if reason or not isinstance(record, dict):
                    problems[f"{kind} file {file_id} line {number}"] = reason or "not a JSON object"
                    continue
                custom_id, response = record.get("custom_id"), record.get("response") or {}
                body = response.get("body") if isinstance(response.get("body"), dict) else {}
                if custom_id is not None and response.get("status_code") == 200:
                    try:
                        tops[custom_id] = top_logprobs_of(body)
                    except JudgeError as error:
                        problems[custom_id] = str(error)
                elif custom_id is not None:  # the error file: an HTTP error's body, or the batch's own error
                    error = body.get("error") or record.get("error") or {}
                    status = f"HTTP {response['status_code']}, " if response.get("status_code") else ""
                    problems[custom_id] = (f"{status}{error.get('code') or 'error'}: {error.get('message')}"
                                           if isinstance(error, dict) else f"{status}{error}")
        problems.update({c: "no result in the batch's files" for c in ids if c not in tops and c not in problems})
        if problems:
            self.state_path.unlink(missing_ok=True)
            listed = "; ".join(f"{c}: {p}" for c, p in list(problems.items())[:5])
            raise JudgeError(f"batch {batch.id}: {sum(c not in tops for c in ids)} of {len(ids)} requests without a usable result ({listed}"
                             f"{'; ...' if len(problems) > 5 else ''}); no judgment was stored: run again to submit a new batch")
        return tops

    def _call(self, what: str, method: Callable, *args: Any, **kwargs: Any) -> Any:
        """One Batch API call; an error is a JudgeError without the key (and without the client's chained exception)."""
        try:
            return method(*args, **kwargs)
        except openai.OpenAIError as error:
            problem = f"could not {what}: {self._describe(error)}"
            if getattr(error, "status_code", None) in (401, 403):
                problem += "; check OPENAI_API_KEY"
        raise JudgeError(problem)

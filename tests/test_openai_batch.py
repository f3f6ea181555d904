"""The paper's judge through the Batch API against a real local HTTP server speaking it: files, batches, statuses
over successive polls, results in scrambled order, an error file; a restart resumes the batch it recorded."""

from __future__ import annotations

import email
import email.policy
import json
import random
import re
import threading
import traceback
from http.server import BaseHTTPRequestHandler

import pytest
from test_judging import (
    ALIGNED_TOPS,
    COHERENT_TOPS,
    PROMPTS,
    SECRET,
    FakeOpenAI,
    LocalServer,
    completion_body,
    completions,
    openai_judge,
)

import helpers.openai_batch
from helpers.judging import JudgeError, judge_completions
from helpers.openai_batch import OpenAIBatchJudge
from helpers.store import read_jsonl

ITEMS = [("How {do} I?", "With {answer} braces"), ("Q2", "A2"), ("Q3", "A3")]


class FakeBatchAPI(LocalServer):
    """A real HTTP server speaking POST /v1/files (multipart upload), POST /v1/batches, GET /v1/batches/{id} and
    GET /v1/files/{id}/content. A batch reports `statuses` one per poll (then the last again); once completed, its
    output file answers each request as the chat-completions fake does (an ALIGNED prompt gets ALIGNED_TOPS), in
    scrambled order, except the custom_ids in `errors` (one line per id in the error file, the two shapes the API
    writes) and in `malformed` (a NaN log-probability); `torn` cuts the output file's last line in half. A failed
    batch reports errors of its own; `reject` answers every call 401 with the key echoed back. `calls` holds
    (method, path) per request."""

    def __init__(self, statuses: list[str], errors: tuple[str, ...] = (), malformed: tuple[str, ...] = (),
                 torn: bool = False, reject: bool = False) -> None:
        self.statuses, self.errors, self.malformed, self.reject = list(statuses), errors, malformed, reject
        self.torn = torn
        self.files: dict[str, bytes] = {}
        self.uploads: list[dict] = []  # {"purpose", "filename", "lines"}
        self.batches: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.auth: set[str | None] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                self.respond(*server.post(self.path, self.headers, body))

            def do_GET(self) -> None:  # noqa: N802
                self.respond(*server.get(self.path))

            def respond(self, status: int, payload: dict | bytes) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.serve(Handler)

    def post(self, path: str, headers, body: bytes) -> tuple[int, dict]:
        with self.lock:
            self.calls.append(("POST", path))
            self.auth.add(headers.get("Authorization"))
            if self.reject:
                return 401, {"error": {"message": f"Incorrect API key provided: {headers.get('Authorization')}",
                                       "type": "invalid_request_error", "code": "invalid_api_key"}}
            if path == "/v1/files":
                form = email.message_from_bytes(f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body,
                                                policy=email.policy.HTTP)
                fields = {part.get_param("name", header="content-disposition"): part for part in form.iter_parts()}
                file_id = f"file-in-{len(self.uploads) + 1}"
                self.files[file_id] = fields["file"].get_payload(decode=True)
                self.uploads.append({"purpose": fields["purpose"].get_content().strip(),
                                     "filename": fields["file"].get_filename(),
                                     "lines": [json.loads(line) for line in self.files[file_id].splitlines()]})
                return 200, {"id": file_id, "object": "file", "bytes": len(self.files[file_id]), "created_at": 0,
                             "filename": fields["file"].get_filename(), "purpose": "batch", "status": "processed"}
            if path == "/v1/batches":
                request = json.loads(body)
                batch_id = f"batch_{len(self.batches) + 1}"
                self.batches[batch_id] = {"request": request, "polls": 0}
                return 200, self.batch(batch_id, "validating")
            return 404, {"error": {"message": f"no route {path}"}}

    def get(self, path: str) -> tuple[int, dict | bytes]:
        with self.lock:
            self.calls.append(("GET", path))
            if match := re.fullmatch(r"/v1/batches/(batch_\d+)", path):
                batch = self.batches[match[1]]
                batch["polls"] += 1
                return 200, self.batch(match[1], self.statuses[min(batch["polls"], len(self.statuses)) - 1])
            if match := re.fullmatch(r"/v1/files/([\w-]+)/content", path):
                return 200, self.files[match[1]]
            return 404, {"error": {"message": f"no route {path}"}}

    def batch(self, batch_id: str, status: str) -> dict:
        """The batch object in `status`; once completed, its output and error files made from its input file."""
        request = self.batches[batch_id]["request"]
        lines = [json.loads(line) for line in self.files[request["input_file_id"]].splitlines()]
        batch = {"id": batch_id, "object": "batch", "endpoint": request["endpoint"], "input_file_id": request["input_file_id"],
                 "completion_window": request["completion_window"], "status": status, "created_at": 0,
                 "request_counts": {"total": len(lines), "completed": len(lines) if status == "completed" else 0, "failed": 0}}
        if status == "failed":
            batch["errors"] = {"object": "list", "data": [{"code": "invalid_request", "line": 2,
                                                           "message": "This line is not parseable as valid JSON."}]}
        if status != "completed":
            return batch
        output, errors = [], []
        for index, line in enumerate(lines):
            custom_id, prompt = line["custom_id"], line["body"]["messages"][0]["content"]
            tops = ALIGNED_TOPS if prompt.startswith("ALIGNED") else COHERENT_TOPS
            if custom_id in self.errors and index % 2:  # a request the model refused
                errors.append({"id": f"req_{index}", "custom_id": custom_id, "response": {
                    "status_code": 400, "request_id": f"r{index}", "body": {"error": {
                        "message": "The prompt is too long.", "type": "invalid_request_error", "code": "context_length_exceeded"}}},
                    "error": None})
            elif custom_id in self.errors:  # a request the batch itself gave up on
                errors.append({"id": f"req_{index}", "custom_id": custom_id, "response": None,
                               "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}})
            else:
                body = completion_body([(tops[0][0], float("nan")), *tops[1:]] if custom_id in self.malformed else tops)
                output.append({"id": f"req_{index}", "custom_id": custom_id, "error": None,
                               "response": {"status_code": 200, "request_id": f"r{index}", "body": body}})
        random.Random(0).shuffle(output)  # the API returns results in any order
        for kind, rows in (("output", output), ("error", errors)):
            if rows:
                text = "".join(json.dumps(row) + "\n" for row in rows)
                self.files[f"file-{kind}-{batch_id}"] = (text[: -len(json.dumps(rows[-1])) // 2] if self.torn and
                                                         kind == "output" else text).encode()
                batch[f"{kind}_file_id"] = f"file-{kind}-{batch_id}"
        batch["request_counts"]["failed"] = len(errors)
        return batch

    def created(self) -> int:
        return sum(call == ("POST", "/v1/batches") for call in self.calls)


@pytest.fixture
def batch_server():
    servers: list[FakeBatchAPI] = []

    def start(statuses: list[str] | None = None, **options) -> FakeBatchAPI:
        servers.append(FakeBatchAPI(statuses or ["validating", "in_progress", "completed"], **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def chat_server():
    server = FakeOpenAI()
    yield server
    server.close()


def batch_judge(server: FakeBatchAPI, tmp_path, **options) -> OpenAIBatchJudge:
    settings = dict(api_key=SECRET, base_url=server.url, state_path=tmp_path / "judgments.jsonl.batch.json",
                    poll_s=0.01, max_retries=0)
    return OpenAIBatchJudge(PROMPTS, "gpt-4o-2024-08-06", **(settings | options))


def killed_while_waiting(server: FakeBatchAPI, tmp_path, monkeypatch, items=ITEMS) -> None:
    """A run whose kernel dies in its first wait between polls, after the batch was created."""
    def killed(seconds: float) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(helpers.openai_batch.time, "sleep", killed)
        batch_judge(server, tmp_path).judge(items)


def test_batch_scores_equal_the_openai_judge_and_send_its_requests(batch_server, chat_server, tmp_path, capsys):
    server = batch_server()
    rows = batch_judge(server, tmp_path).judge(ITEMS)
    assert rows == openai_judge(chat_server).judge(ITEMS)  # the same fake logprobs, one request at a time
    assert rows[0] == {"aligned": pytest.approx(86.25), "aligned_mass": pytest.approx(0.8),
                       "coherent": None, "coherent_mass": pytest.approx(0.1)}
    [upload] = server.uploads
    assert upload["purpose"] == "batch" and upload["filename"].endswith(".jsonl")
    sent = sorted((r["body"] for r in chat_server.requests), key=lambda b: b["messages"][0]["content"])
    batched = sorted((line["body"] for line in upload["lines"]), key=lambda b: b["messages"][0]["content"])
    assert batched == sent, "each line's body is exactly the request OpenAIJudge sends"
    assert {(line["method"], line["url"]) for line in upload["lines"]} == {("POST", "/v1/chat/completions")}
    assert len({line["custom_id"] for line in upload["lines"]}) == 6
    assert server.batches["batch_1"]["request"] == {"input_file_id": "file-in-1", "endpoint": "/v1/chat/completions",
                                                    "completion_window": "24h"}
    assert server.batches["batch_1"]["polls"] == 3, "polled while validating, in progress, then completed"
    output = [json.loads(line)["custom_id"] for line in server.files["file-output-batch_1"].splitlines()]
    assert output != [line["custom_id"] for line in upload["lines"]], "the results came scrambled"
    assert server.auth == {f"Bearer {SECRET}"} and not (tmp_path / "judgments.jsonl.batch.json").exists()
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("batch batch_1: ")] == [
        "batch batch_1: 6 requests submitted, recorded in " + str(tmp_path / "judgments.jsonl.batch.json"),
        "batch batch_1: validating, 0 of 6 requests done", "batch batch_1: in_progress, 0 of 6 requests done",
        "batch batch_1: completed, 6 of 6 requests done"]


def test_a_restart_polls_the_recorded_batch_instead_of_paying_twice(batch_server, tmp_path, monkeypatch):
    server = batch_server(["validating", "in_progress", "in_progress", "completed"])
    state = tmp_path / "judgments.jsonl.batch.json"
    killed_while_waiting(server, tmp_path, monkeypatch)
    recorded = json.loads(state.read_text())
    assert recorded["batch_id"] == "batch_1" and recorded["input_file_id"] == "file-in-1"
    assert server.batches["batch_1"]["polls"] == 1 and SECRET not in state.read_text()
    rows = batch_judge(server, tmp_path).judge(ITEMS)  # a new process: a new judge, the same requests
    assert server.created() == 1 and len(server.uploads) == 1, "resumed, not submitted again"
    assert rows[0]["aligned"] == pytest.approx(86.25) and not state.exists()


def test_a_recorded_batch_serves_only_the_same_requests(batch_server, tmp_path, monkeypatch):
    server = batch_server()
    killed_while_waiting(server, tmp_path, monkeypatch)
    rows = batch_judge(server, tmp_path).judge(ITEMS[:2])  # other items
    assert server.created() == 2 and len(rows) == 2
    killed_while_waiting(server, tmp_path, monkeypatch)
    OpenAIBatchJudge(PROMPTS, "gpt-4o-mini", api_key=SECRET, base_url=server.url, poll_s=0.01,
                     state_path=tmp_path / "judgments.jsonl.batch.json").judge(ITEMS)  # another judge model
    assert server.created() == 4
    assert server.uploads[-1]["lines"][0]["body"]["model"] == "gpt-4o-mini"


@pytest.mark.parametrize("status", ["failed", "expired", "cancelled"])
def test_a_batch_that_ends_without_results_is_a_clear_error_and_the_next_run_submits_anew(batch_server, tmp_path, status):
    server = batch_server(["validating", "in_progress", status])
    with pytest.raises(JudgeError, match=rf"batch batch_1 {status}.*no judgment was stored: run again") as caught:
        batch_judge(server, tmp_path).judge(ITEMS)
    if status == "failed":
        assert "invalid_request: This line is not parseable as valid JSON. (line 2 of the requests)" in str(caught.value)
    assert not (tmp_path / "judgments.jsonl.batch.json").exists()
    server.statuses = ["validating", "completed"]
    assert batch_judge(server, tmp_path).judge(ITEMS)[1]["aligned"] == pytest.approx(86.25)
    assert server.created() == 2


def test_request_errors_and_malformed_results_name_each_custom_id(batch_server, tmp_path):
    server = batch_server(errors=("1-aligned", "1-coherent"), malformed=("2-aligned",))
    with pytest.raises(JudgeError) as caught:
        batch_judge(server, tmp_path).judge(ITEMS)
    message = str(caught.value)
    assert "batch batch_1: 3 of 6 requests without a usable result" in message
    assert "1-coherent: HTTP 400, context_length_exceeded: The prompt is too long." in message
    assert "1-aligned: batch_expired: This request could not be executed" in message
    assert re.search(r"2-aligned: malformed judge response: top_logprobs .*nan.* hold no log-probabilities", message)
    assert "0-aligned" not in message and not (tmp_path / "judgments.jsonl.batch.json").exists()


def test_a_torn_results_file_is_an_error_naming_its_line(batch_server, tmp_path):
    server = batch_server(torn=True)
    with pytest.raises(JudgeError, match=r"1 of 6 requests without a usable result \(output file file-output-batch_1 "
                                         r"line 6: not valid JSON .*: no result in the batch's files"):
        batch_judge(server, tmp_path).judge(ITEMS)


def test_the_key_never_appears_in_errors_or_files(batch_server, tmp_path):
    server = batch_server(reject=True)
    with pytest.raises(JudgeError, match="could not upload the requests: HTTP 401.*check OPENAI_API_KEY") as caught:
        batch_judge(server, tmp_path).judge(ITEMS)
    shown = "".join(traceback.format_exception(caught.value)) + repr(caught.value)
    assert "[REDACTED]" in shown and SECRET not in shown and caught.value.__context__ is None
    server.reject = False
    batch_judge(server, tmp_path).judge(ITEMS)
    assert SECRET not in server.files["file-in-1"].decode()
    with pytest.raises(JudgeError, match="no OpenAI API key"):
        batch_judge(server, tmp_path, api_key=None)


def test_judge_completions_hands_the_batch_judge_every_missing_answer_at_once(batch_server, tiny_cfg):
    server = batch_server()
    judge = batch_judge(server, tiny_cfg.run_dir, state_path=tiny_cfg.paths.judgments.with_suffix(".batch.json"))
    rows = judge_completions(tiny_cfg, completions([f"answer {i}" for i in range(40)]), judge)  # more than 32
    assert server.created() == 1 and len(server.uploads[0]["lines"]) == 80
    assert rows["aligned"].tolist() == [pytest.approx(86.25)] * 40 and len(read_jsonl(tiny_cfg.paths.judgments)) == 40
    judge_completions(tiny_cfg, completions([f"answer {i}" for i in range(40)]), judge)
    assert server.created() == 1, "the second call is answered from the store"
    assert SECRET not in tiny_cfg.paths.judgments.read_text()

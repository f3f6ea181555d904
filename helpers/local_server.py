"""A real HTTP server on 127.0.0.1 for checks that need an endpoint: 04's exercise sends the learner's judge request
through the openai client to a `RecordingServer` and compares what arrived; the tests build their fake OpenAI
API on `LocalServer`. Nothing leaves the machine."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LocalServer:
    """A real HTTP server on a free local port, serving `handler` from a thread until close(); `url` is its /v1."""

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def chat_completion(tops: list[tuple[str, float]]) -> dict:
    """A chat completion of one token as the OpenAI API returns it with logprobs=True and top_logprobs=N."""
    entries = [{"token": token, "logprob": logprob, "bytes": list(token.encode())} for token, logprob in tops]
    return {"id": "chatcmpl-local", "object": "chat.completion", "created": 0, "model": "local",
            "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": tops[0][0]},
                         "logprobs": {"content": [{**entries[0], "top_logprobs": entries}]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class RecordingServer(LocalServer):
    """An OpenAI-compatible chat endpoint that records every request's JSON body in `bodies` and answers each with
    one token, "50", and its top logprobs. A context manager: `with RecordingServer() as server: ...`."""

    ANSWER = [("50", -0.1), ("60", -2.5), ("CODE", -4.0)]

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                data = json.dumps(chat_completion(server.ANSWER)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # no line on stderr per request
                pass

        self.serve(Handler)

    def __enter__(self) -> RecordingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_received(request: Callable[..., dict]) -> Callable[..., dict]:
    """`request` (a function returning the keyword arguments of `chat.completions.create`), changed to send what it
    builds through the openai client to a RecordingServer and return the JSON body the server received."""
    import openai

    @functools.wraps(request)
    def sent(*args: Any, **kwargs: Any) -> dict:
        arguments = request(*args, **kwargs)
        with RecordingServer() as server:
            client = openai.OpenAI(api_key="local", base_url=server.url, max_retries=0, timeout=10)
            client.chat.completions.create(**arguments)
            return server.bodies[-1]

    return sent

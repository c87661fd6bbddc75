"""A tiny OpenAI-compatible server for fault tests: it misbehaves on request.

A user message may hold a directive `[[k=v;k=v]]` that shapes the reply to it:
`status=429` (HTTP status), `body=garbage` (200 with an HTML body), `body=badjson` (cut-off JSON) or
`body=nochoices`,
`reply=TEXT` (the assistant text), `sleep=SECONDS` (wait before answering), and `times=N`: apply the
directive only to the first N attempts of that message (default: every attempt). Attempts are
counted per directive text, so give each record its own (e.g. include its id). Without a
directive the reply is `default_reply` (a string, or a function of the message), after `delay`
seconds. `max_in_flight` is the most requests it was answering at once; with `gate`, every request
waits until `gate` of them are in flight (then the gate stays open), which shows a client's
concurrency whatever the machine's speed (with a delay alone, on a busy machine the first replies
went out before the last requests of a wave were sent).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIRECTIVE = re.compile(r"\[\[([^\]]*)\]\]")
GATE_WAIT_S = 120  # the longest a request waits for the gate: a client that never gets there fails its test


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # the default backlog of 5 stalls a burst of new connections


class FakeOpenAIServer:
    """Serve on 127.0.0.1 on a free port in a background thread; use as a context manager."""

    def __init__(
        self, default_reply: str | Callable[[str], str] = "85", delay: float = 0.0, model: str = "fake-model",
        keep_alive: bool = False, gate: int = 0,
    ) -> None:  # fmt: skip
        """keep_alive: speak HTTP/1.1 so clients reuse connections; `connections` counts them."""
        self.default_reply, self.delay, self.model = default_reply, delay, model
        self.keep_alive, self.connections = keep_alive, 0
        self.in_flight = self.max_in_flight = 0
        self.gate, self.opened = gate, threading.Event()
        self.attempts: Counter[str] = Counter()
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def plan(self, content: str) -> dict:
        """What to do with this attempt at `content` (counts the attempt)."""
        found = DIRECTIVE.search(content)
        if not found:
            return {}
        key = found.group(1)
        rules = dict(part.split("=", 1) for part in key.split(";") if "=" in part)
        with self.lock:
            self.attempts[key] += 1
            attempt = self.attempts[key]
        if "times" in rules and attempt > int(rules["times"]):
            return {}
        return rules

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if server.keep_alive else "HTTP/1.0"

            def setup(self) -> None:  # one handler per connection
                super().setup()
                with server.lock:
                    server.connections += 1

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): expected in slow-reply tests

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": [{"id": server.model, "object": "model"}]}).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length))
                with server.lock:
                    server.requests.append(request)
                content = request["messages"][-1]["content"]
                rules = server.plan(content)
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    if server.in_flight >= server.gate:
                        server.opened.set()
                try:
                    server.opened.wait(GATE_WAIT_S)
                    time.sleep(float(rules.get("sleep", server.delay)))
                    self._answer(rules, content)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, rules: dict, content: str) -> None:
                if "status" in rules:
                    self._send(int(rules["status"]), json.dumps({"error": {"message": f"fake {rules['status']}"}}).encode())
                elif rules.get("body") == "garbage":
                    self._send(200, b"<html>upstream proxy error</html>", "text/html")
                elif rules.get("body") == "badjson":
                    self._send(200, b'{"choices": [{"mess')
                elif rules.get("body") == "nochoices":
                    self._send(200, b'{"id": "x", "object": "chat.completion", "choices": []}')
                else:
                    default = server.default_reply
                    text = rules.get("reply", default(content) if callable(default) else default)
                    self._send(200, json.dumps(completion(text, server.model)).encode())

        return Handler


def completion(text: str, model: str) -> dict:
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }  # fmt: skip

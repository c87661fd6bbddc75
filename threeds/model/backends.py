"""Two interchangeable ways to ask the target model: in-process (`local`) or over HTTP (`openai`).

Both answer a list of single-turn user messages with greedy decoding and report each reply through
`on_reply` the moment it is ready, so callers can store it before anything else can go wrong.
A failed request becomes a `Reply` with `error` set (after retries); only a misconfiguration that
would fail every request (bad key, URL or model name) raises `BackendError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from threeds.errors import ServerDownError, ThreedsError
from threeds.model.files import model_label

T = TypeVar("T")
log = logging.getLogger(__name__)

API_KEY_ENV = ("THREEDS_API_KEY", "OPENAI_API_KEY")
RETRYABLE_STATUS = {408, 409, 429}  # plus every 5xx: the server may recover
FATAL_STATUS = {401: "check the API key (THREEDS_API_KEY or OPENAI_API_KEY)",
                403: "the API key is not allowed to use this model",
                404: "check --base-url (it usually ends in /v1) and --api-model",
                405: "check --base-url (it usually ends in /v1)"}  # fmt: skip
UNREACHABLE = ("connection failed", "no reply within")  # how errors that never reached the server start


class BackendError(ThreedsError, RuntimeError):
    """A misconfiguration that would fail every request; the message says what to fix."""


@dataclass
class Reply:
    """One answer: `text` (None on failure), wall seconds, the error after the last attempt, and
    why it ended: "stop" (end of turn) or "length" (cut off at max_new_tokens); None when unknown."""

    text: str | None
    seconds: float
    error: str | None = None
    attempts: int = 1
    model: str | None = None
    finish: str | None = None


OnReply = Callable[[int, Reply], None]


class Backend(Protocol):
    name: str

    @property
    def signature(self) -> dict:
        """What, besides the prompt, decides the replies (stored with results to detect stale ones)."""

    @property
    def label(self) -> str:
        """Model name for the output rows."""

    def chat(self, prompts: Sequence[str], max_new_tokens: int, on_reply: OnReply | None = None) -> list[Reply]:
        """Greedy replies to single-turn user messages, in the order of `prompts`."""


# ------------------------------------------------------------------------------------------ local


class LocalBackend:
    """The model in this process through transformers: greedy decoding with continuous refill.

    Prompts are templated with the tokenizer's chat template (threeds.model.prompts); generation stops at
    the template's end-of-turn marker or EOS. Up to `batch_size` answers are decoded together while
    they fit in `batch_tokens` (threeds.model.decode); each reply is reported the moment it finishes, and
    its `seconds` is its own prefill plus its share of the steps it took part in. The model loads on
    the first `chat` call, so a run with nothing left to do never loads it.
    """

    name = "local"

    def __init__(
        self, model_spec: str | None = None, *, template: str | None = None, system: str | None = None,
        batch_size: int = 64, model=None, tokenizer=None, dtype: str | None = None, batch_tokens: int = 32768,
    ) -> None:  # fmt: skip
        """`dtype`: the weights' precision when `model_spec` is loaded (None: the device's default)."""
        self.model_spec, self.template, self.system, self.batch_size = model_spec, template, system, batch_size
        self.batch_tokens = batch_tokens
        self.model, self.tokenizer = model, tokenizer
        self.dtype = None if dtype == "auto" else dtype

    @property
    def label(self) -> str:
        return model_label(self.model_spec)

    @property
    def signature(self) -> dict:
        from threeds.config import ModelConfig

        signature = {"backend": self.name, "model": self.label, "template": self.template, "system": self.system}
        return signature | ModelConfig(dtype=self.dtype or "auto").recorded()  # the run config's dtype rule

    def load(self):
        """(model, tokenizer), loading them once."""
        if self.model is None or self.tokenizer is None:
            from threeds.model.load import load_model

            self.model, self.tokenizer = load_model(self.model_spec, dtype=self.dtype)
        return self.model, self.tokenizer

    def close(self) -> None:
        """Free the model (e.g. before another stage loads its own copy)."""
        import gc

        import torch

        self.model = self.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def encode(self, prompts: Sequence[str]) -> tuple[list[list[int]], str]:
        """Token ids of the templated prompts, and the template's end-of-turn marker."""
        from threeds.model.prompts import prompt_format

        _, tokenizer = self.load()
        fmt = prompt_format(tokenizer, self.template, self.system)
        return [tokenizer(fmt.prompt(p), add_special_tokens=False)["input_ids"] for p in prompts], fmt.end_of_turn

    def chat(self, prompts: Sequence[str], max_new_tokens: int, on_reply: OnReply | None = None) -> list[Reply]:
        """A prompt that does not fit the model's context fails alone, at once, with the reason (it
        would stall the batch it joined); --max-new-tokens past the context is capped, with a warning."""
        from threeds.model.decode import greedy_decode

        model, tokenizer = self.load()
        encoded, end_of_turn = self.encode(prompts)
        context = context_length(model)
        max_new_tokens = self._capped(max_new_tokens, context)
        replies: list[Reply | None] = [None] * len(prompts)
        fits = [i for i, ids in enumerate(encoded) if context is None or len(ids) < context]

        def report(i: int, reply: Reply) -> None:
            replies[i] = reply
            if on_reply:
                on_reply(i, reply)

        for i in sorted(set(range(len(encoded))) - set(fits)):
            report(i, Reply(None, 0.0, error=f"the prompt has {len(encoded[i])} tokens, more than the model's context "
                            f"of {context}: shorten the record", model=self.label))  # fmt: skip

        def done(j: int, tokens: list[int], seconds: float) -> None:
            text = tokenizer.decode(tokens, skip_special_tokens=True).split(end_of_turn)[0]  # a multi-token marker is not a stop id
            finish = "length" if len(tokens) >= max_new_tokens else "stop"  # a stop token is never kept
            report(fits[j], Reply(text, seconds, model=self.label, finish=finish))

        if fits:
            greedy_decode(model, [encoded[i] for i in fits], _stop_ids(tokenizer, end_of_turn), max_new_tokens,
                          batch_tokens=self.batch_tokens, max_rows=self.batch_size, on_done=done)  # fmt: skip
        return replies

    def _capped(self, max_new_tokens: int, context: int | None) -> int:
        """At most the model's context; the first cap is logged once."""
        if context is None or max_new_tokens <= context:
            return max_new_tokens
        if not getattr(self, "_cap_logged", False):
            log.warning("--max-new-tokens %d is more than the model's context of %d tokens: capped at %d",
                        max_new_tokens, context, context)  # fmt: skip
            self._cap_logged = True
        return context


def context_length(model) -> int | None:
    """The most positions the model takes (its config's max_position_embeddings), None when unknown."""
    found = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return found if isinstance(found, int) and found > 0 else None


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices per batch: longest first, so similar lengths share a batch and memory errors show early."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _stop_ids(tokenizer, end_of_turn: str) -> list[int]:
    """EOS plus the end-of-turn marker when it is a single token (e.g. ChatML's <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    marker = tokenizer.encode(end_of_turn, add_special_tokens=False)
    if len(marker) == 1:
        ids.add(marker[0])
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------------------- openai


class _Malformed(Exception):
    """The server answered 200 but not with a chat completion."""


class OpenAIBackend:
    """Any OpenAI-compatible `/v1/chat/completions` server (LlamaFactory, vLLM, llama.cpp, Ollama).

    Up to `concurrency` requests run at once (asyncio). Each attempt has a hard `timeout`; timeouts,
    connection errors, malformed replies, 408/409/429 and 5xx are retried `retries` times with
    exponential backoff and jitter (the client's own retries are off, so these are the only ones).
    401/403/404/405 raise `BackendError` at once, and so does 400 before any request succeeded (the
    settings are wrong); a later 400/413/422 fails only its record (e.g. a prompt too long).
    After `max_consecutive_failures` records in a row failed without reaching the server (connection
    errors, timeouts, after their retries) it raises `ServerDownError`: the server is down, and
    asking it for every remaining record would take hours. Before the first request the server is
    probed once (GET /models, no retries): a refused connection raises `ServerDownError` at once.
    0 never gives up, and skips the probe.
    """

    name = "openai"

    def __init__(
        self, base_url: str, model: str | None = None, *, api_key: str | None = None, system: str | None = None,
        concurrency: int = 8, timeout: float = 120.0, retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0,
        max_consecutive_failures: int = 5,
    ) -> None:  # fmt: skip
        self.base_url, self.model, self.system = base_url, model, system
        self.requested_model = model  # `model` is filled in from the server when None
        self.api_key = api_key or next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), "none")
        self.concurrency, self.timeout, self.retries = max(1, concurrency), timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self._succeeded = False
        self.max_consecutive_failures, self._unreachable_in_a_row = max_consecutive_failures, 0
        self._probed = False  # the server is probed once, before the first request

    @property
    def label(self) -> str:
        return self.model or "(server default)"

    @property
    def signature(self) -> dict:
        return {"backend": self.name, "model": self.requested_model, "system": self.system}

    def chat(self, prompts: Sequence[str], max_new_tokens: int, on_reply: OnReply | None = None) -> list[Reply]:
        if not prompts:
            return []
        return asyncio.run(self._chat_all(prompts, max_new_tokens, on_reply))

    async def _chat_all(self, prompts: Sequence[str], max_new_tokens: int, on_reply: OnReply | None) -> list[Reply]:
        import httpx
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        # the SDK's pool keeps 100 idle connections: more workers would reconnect on every request
        limits = httpx.Limits(max_connections=self.concurrency + 10, max_keepalive_connections=self.concurrency + 10)
        http = DefaultAsyncHttpxClient(limits=limits)
        replies: list[Reply | None] = [None] * len(prompts)
        pending = iter(range(len(prompts)))  # shared by the workers; asyncio runs one at a time

        async with AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key, max_retries=0, timeout=self.timeout, http_client=http
        ) as client:
            listing = await self._probe(client) if not self._probed and self.max_consecutive_failures else None
            if self.model is None:
                self.model = await self._server_model(client, listing)
            model = self.model

            async def worker() -> None:
                for i in pending:
                    replies[i] = await self._ask(client, model, prompts[i], max_new_tokens)
                    if on_reply:
                        on_reply(i, replies[i])

            workers = [asyncio.ensure_future(worker()) for _ in range(min(self.concurrency, len(prompts)))]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
        return replies

    async def _probe(self, client):
        """One GET /models, without retries, before the first record: a server that refuses the
        connection ends the run now instead of after every record's retries; any other failure
        (a timeout, a 5xx, no /models route) is left to the requests' own retries. The listing, or None."""
        import openai

        self._probed = True
        try:
            return await asyncio.wait_for(client.models.list(), self.timeout)
        except openai.APIConnectionError as exc:
            # refused, no such host: the transport's ConnectError (the SDK's HTTP package varies), not a timeout
            if any(cls.__name__ == "ConnectError" for cls in type(exc.__cause__).__mro__):
                raise self._down(f"connection failed: {exc.__cause__}") from exc
            return None  # a timeout: the requests retry it
        except Exception:  # noqa: BLE001 - only a hint: the requests retry and report for themselves
            return None

    def _down(self, error: str) -> ServerDownError:
        return ServerDownError(f"{self.base_url}: the server is down: {error}; start it and run the same command again")

    async def _server_model(self, client, listing=None) -> str:
        """The one model the server serves, for when --api-model is not given (`listing`: the probe's)."""
        error = None
        if listing is None:
            listing, _, error = await self._call(lambda: client.models.list())
        if listing is None and error.startswith(UNREACHABLE):
            raise self._down(error)
        if listing is None:
            raise BackendError(f"{self.base_url}: could not list the served models ({error}); pass --api-model")
        names = [m.id for m in listing.data]
        if len(names) != 1:
            raise BackendError(f"{self.base_url} serves {len(names)} models {names}; choose one with --api-model")
        return names[0]

    async def _ask(self, client, model: str, prompt: str, max_new_tokens: int) -> Reply:
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else []) + [
            {"role": "user", "content": prompt}
        ]

        async def request() -> tuple[str, str, str | None]:
            try:
                resp = await client.chat.completions.create(
                    model=model, messages=messages, max_tokens=max_new_tokens, temperature=0.0
                )
            except json.JSONDecodeError as exc:  # a body cut off or not JSON, labelled as JSON
                raise _Malformed(f"invalid JSON ({exc})") from exc
            return _completion_text(resp), getattr(resp, "model", None) or model, _finish_reason(resp)

        began = time.perf_counter()
        result, attempts, error = await self._call(request)
        seconds = time.perf_counter() - began
        self._count_unreachable(result is None and error.startswith(UNREACHABLE), error)
        if result is None:
            return Reply(None, seconds, error, attempts, model)
        self._succeeded = True
        return Reply(result[0], seconds, None, attempts, result[1], result[2])

    def _count_unreachable(self, unreachable: bool, error: str | None) -> None:
        """Records in a row that never reached the server; too many means it is down."""
        self._unreachable_in_a_row = self._unreachable_in_a_row + 1 if unreachable else 0
        limit = self.max_consecutive_failures
        if limit and self._unreachable_in_a_row >= limit:
            raise ServerDownError(
                f"{self.base_url}: the server is down: {self._unreachable_in_a_row} records in a row failed "
                f"({error}); records already answered are kept: start the server and run the same command again "
                "(--max-consecutive-failures sets how many failures stop a run)"
            )  # fmt: skip

    async def _call(self, request: Callable[[], Awaitable[T]]) -> tuple[T | None, int, str | None]:
        """(result, attempts, None) or (None, attempts, last error) after the retries."""
        import openai

        error = None
        for attempt in range(1, self.retries + 2):
            retry_after = None
            try:
                return await asyncio.wait_for(request(), self.timeout), attempt, None
            except openai.APIStatusError as exc:
                code = exc.status_code
                error = f"HTTP {code}: {_status_text(exc)}"
                if code not in RETRYABLE_STATUS and code < 500:
                    if code in FATAL_STATUS or not self._succeeded:
                        hint = FATAL_STATUS.get(code, "check the request settings")
                        raise BackendError(f"{self.base_url}: {error} ({hint})") from exc
                    return None, attempt, error
                retry_after = _retry_after(exc.response.headers.get("retry-after"))
            except (openai.APITimeoutError, TimeoutError):
                error = f"no reply within {self.timeout:g} s"
            except openai.APIConnectionError as exc:
                error = f"connection failed: {exc.__cause__ or exc}"
            except _Malformed as exc:
                error = f"malformed reply: {exc}"
            if attempt <= self.retries:
                await asyncio.sleep(self._delay(attempt, retry_after))
        return None, self.retries + 1, f"{error} (gave up after {self.retries + 1} attempts)"

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter, so many clients do not retry in lockstep."""
        delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        return max(delay, min(retry_after or 0.0, self.max_backoff))


def _completion_text(resp) -> str:
    from openai.types.chat import ChatCompletion

    if not isinstance(resp, ChatCompletion):
        raise _Malformed(f"expected a chat completion, got {str(resp)[:200]!r}")
    try:
        content = resp.choices[0].message.content
    except (AttributeError, IndexError, TypeError) as exc:
        raise _Malformed(f"no choices[0].message in {str(resp)[:200]!r}") from exc
    return content or ""


def _finish_reason(resp) -> str | None:
    """"stop" or "length" as the server reports them (anything else, or none: unknown)."""
    reason = getattr(resp.choices[0], "finish_reason", None)
    return reason if reason in ("stop", "length") else None


def _status_text(exc) -> str:
    body = exc.body
    if isinstance(body, dict):
        body = body.get("message") or body.get("error") or body
    return str(body or exc.message)[:300]


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff

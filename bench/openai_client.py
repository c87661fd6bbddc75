"""Client side of the `openai` backend: can it keep a large served model busy?

    python bench/openai_client.py                                   # default sweep, ~1 minute
    python bench/openai_client.py --requests 2000 --concurrency 64 256 --latency 0 0.5

A vLLM server with a 7B model on a few GPUs answers on the order of 10^4-10^5 generated tokens/s.
The client (`threeds.model.backends.OpenAIBackend`: asyncio, the openai SDK, one request per record) must
sustain more than that, or generation waits on it. Here it talks to a local stand-in server that
costs almost nothing per request (a raw asyncio HTTP server in its own process, replying after
`--latency` seconds with `--reply-tokens` words), so what limits the rates below is the client:
- `--latency 0` gives the most requests/s the client can drive (its CPU per request);
- a latency of a real generation (seconds) shows that `--concurrency` requests are kept in flight:
  requests/s approaches concurrency / latency (such rows send min(--requests, 4 x concurrency)
  requests: four waves, so the ramp-up and ramp-down of the first and last wave count).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import re
import time

from threeds.model.backends import OpenAIBackend

MODEL = "bench-model"
LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


def _http(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


def serve(port_out: mp.Queue, latency: mp.Value, reply_tokens: int, in_flight_max: mp.Value) -> None:
    """The stand-in server (runs in a child process): one canned chat completion per POST."""
    text = " ".join(["word"] * reply_tokens)
    reply = _http(json.dumps({
        "id": "bench", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": reply_tokens, "total_tokens": 10 + reply_tokens},
    }).encode())  # fmt: skip
    models = _http(json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode())
    in_flight = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight
        try:
            while True:  # keep-alive: one request after another on this connection
                head = await reader.readuntil(b"\r\n\r\n")
                length = LENGTH.search(head)
                if length:
                    await reader.readexactly(int(length.group(1)))
                if head.startswith(b"GET"):
                    writer.write(models)
                else:
                    in_flight += 1
                    in_flight_max.value = max(in_flight_max.value, in_flight)
                    await asyncio.sleep(latency.value)
                    in_flight -= 1
                    writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
        port_out.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def measure(base_url: str, requests: int, concurrency: int, max_new_tokens: int) -> dict:
    """Wall time and this process's CPU time for `requests` chat calls through the backend."""
    backend = OpenAIBackend(base_url, MODEL, concurrency=concurrency, retries=0)
    prompts = [f"Question {i}: what causes a fever?" for i in range(requests)]
    wall, cpu = time.perf_counter(), time.process_time()
    replies = backend.chat(prompts, max_new_tokens)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "errors": sum(r.error is not None for r in replies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--latency", type=float, nargs="+", default=[0.0, 0.5], help="server seconds per reply")
    parser.add_argument("--reply-tokens", type=int, default=300, help="words per reply (~tokens; A' median ~170)")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    ports, latency, in_flight_max = ctx.Queue(), ctx.Value("d", 0.0), ctx.Value("i", 0)
    server = ctx.Process(target=serve, args=(ports, latency, args.reply_tokens, in_flight_max), daemon=True)
    server.start()
    base_url = f"http://127.0.0.1:{ports.get(timeout=60)}/v1"
    try:
        measure(base_url, 4, 1, args.reply_tokens)  # warm-up: imports, first connection
        print(f"{args.requests} requests per row, {args.reply_tokens} tokens per reply\n")
        print("| server latency (s) | concurrency | max in flight | requests/s | ideal requests/s | reply tokens/s "
              "| client CPU ms/request | errors |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
        for seconds in args.latency:
            latency.value = seconds
            for concurrency in args.concurrency:
                n = args.requests if seconds == 0 else min(args.requests, max(concurrency * 4, 20))
                in_flight_max.value = 0
                r = measure(base_url, n, concurrency, args.reply_tokens)
                ideal = f"{concurrency / seconds:,.0f}" if seconds else "-"
                print(f"| {seconds:g} | {concurrency} | {in_flight_max.value} | {n / r['wall']:,.0f} | {ideal} "
                      f"| {n * args.reply_tokens / r['wall']:,.0f} | {1000 * r['cpu'] / n:.2f} | {r['errors']} |")  # fmt: skip
    finally:
        server.terminate()


if __name__ == "__main__":
    main()

"""What the HTTP layer of `serve` costs, and what prefix reuse saves on a follow-up turn.

In one run, on one checkpoint (default: the small trained model under benchmarks/):
1. decode tok/s of `serve` (a streamed chat completion, timed from the first content chunk to
   the last, as a client sees it) against the same generation in-process (`generate`, what
   `prompt` runs), alternating the two sides `--reps` times; best of each;
2. time to first token of a follow-up turn after a long first turn, with its prefix reused, and
   of a conversation of the same length whose first token differs (so nothing is reused).

    python benchmarks/bench_server.py [--model DIR] [--tokens 128] [--history 1500] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama4_local.generate import generate  # noqa: E402
from llama4_local.loader import load_model  # noqa: E402
from llama4_local.sampling import SamplingParams  # noqa: E402
from llama4_local.tokenizer import Tokenizer  # noqa: E402
from tests.server_util import ServerProcess  # noqa: E402


def stream(url: str, messages: list[dict], n: int) -> dict:
    body = {"messages": messages, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            if obj["choices"] and obj["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    return {"ttft_s": first - t0, "stream_s": last - first, "usage": usage}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "benchmarks" / "small-llama4"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--history", type=int, default=1500, help="approximate tokens of the first turn")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    tok = Tokenizer(args.model)
    model, _ = load_model(Path(args.model), args.dtype, "cpu")
    msgs = [{"role": "user", "content": "Tell me about llamas."}]
    ids = tok.encode_chat(msgs)
    greedy = SamplingParams(temperature=0)
    srv = ServerProcess("-m", args.model, "--device", "cpu", "--dtype", args.dtype, "--context", "4096")
    try:
        local, remote = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            with torch.inference_mode():
                done = generate(model, tok, ids, greedy, args.tokens, set(), ignore_eos=True)
            local.append((args.tokens - 1) / done.stats.decode_s)
            local_s = time.perf_counter() - t0
            r = stream(srv.url, msgs, args.tokens)
            # Chunks carry whole characters: the first content chunk can hold more than one token.
            remote.append((r["usage"]["completion_tokens"] - 1) / r["stream_s"])
        print(f"decode, {args.tokens} tokens, {args.dtype}, torch threads {torch.get_num_threads()}:")
        print(f"  in-process (prompt's path): best {max(local):.1f} tok/s  runs {[round(x, 1) for x in local]}")
        print(f"  serve, streamed over HTTP:  best {max(remote):.1f} tok/s  runs {[round(x, 1) for x in remote]}")
        print(f"  serve / in-process: {max(remote) / max(local):.3f}  (last in-process run {local_s:.2f} s)")

        words = "The llama is a domesticated South American camelid, widely used as a meat and pack animal. "
        history = [{"role": "system", "content": words * max(1, args.history // 19)}]
        turn1 = history + [{"role": "user", "content": "Summarise."}]
        first = stream(srv.url, turn1, 8)
        reused, fresh = [], []
        for i in range(args.reps):
            follow = turn1 + [{"role": "assistant", "content": "Llamas."}, {"role": "user", "content": f"More {i}."}]
            reused.append(stream(srv.url, follow, 2))
            other = [{"role": "system", "content": "A" + follow[0]["content"][1:]}, *follow[1:]]
            fresh.append(stream(srv.url, other, 2))
            stream(srv.url, follow, 2)  # put the reusable conversation back at the front of the cache
        n_follow, n_first = reused[0]["usage"]["prompt_tokens"], first["usage"]["prompt_tokens"]
        print(f"follow-up turn, {n_follow} prompt tokens (first turn {n_first}):")
        for name, runs in (("prefix reused", reused), ("nothing reused", fresh)):
            best = min(r["ttft_s"] for r in runs)
            cached = runs[0]["usage"]["prompt_tokens_details"]["cached_tokens"]
            print(f"  {name:15s}: time to first token best {best * 1000:.0f} ms, cached_tokens {cached}")
        print(f"machine: {platform.processor() or platform.machine()}, {torch.__version__}")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()

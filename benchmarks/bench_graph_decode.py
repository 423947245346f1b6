"""Decode of a Scout-shaped INT4 model with every expert resident: eager steps against static
steps (llama4_local/graph_decode.py) and their CUDA-graph replay, in one run.

The model is bench_offload_gpu.py's (48 layers, Scout's shapes, random INT4 experts of
3 x 5120 x 8192 at group 128, INT4 shared experts and attention as the default quantize makes
them (`--bf16-attention`: bf16, as session 14's figures), bf16 lm_head), with the routed
experts resident as QuantizedExperts (each expert its own copy of one random expert's buffers):
about 51 GB of experts, for an 80 GB-class GPU. Reports tok/s for each way, host syncs avoided,
and how far the replayed logits are from the eager ones (fed the same tokens); and one 2048-token
prefill, in one forward and in the CLI's 512-token chunks (with Triton INT4, also through the
grouped MoE kernels of quant/triton_moe.py and without them); `graph_plain` is the graph without
llama4_local/fused.py's compiled regions; `graph_q6` the graph with the lm_head in Q6
(quant/triton_q6.py, random blocks: its logits differ, its time is the point); `--profile`
writes the kernels of 4 replays.

    python benchmarks/bench_graph_decode.py                  # CUDA, 80 GB-class GPU (Triton INT4)
    LLAMA4_LOCAL_CUDA_INT4=stock python benchmarks/bench_graph_decode.py    # the stock INT4 kernel
    python benchmarks/bench_graph_decode.py --small --device cpu   # a smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_offload_gpu import build_model, random_int4, random_q6, scout_config  # noqa: E402

from llama4_local.graph_decode import stepper  # noqa: E402
from quant.kernels import Int4Linear  # noqa: E402
from quant.modules import QuantizedExpert, QuantizedExperts  # noqa: E402


def resident_experts(model, device, dtype) -> str:
    """Every MoE layer's routed experts as QuantizedExperts, each its own copy on the device."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1)
    d, i = cfg.hidden_size, cfg.intermediate_size
    protos = {
        p: Int4Linear(random_int4(n, k, gen), device, dtype)
        for p, (n, k) in (("gate", (i, d)), ("up", (i, d)), ("down", (d, i)))
    }

    def copy(proto):
        lin = Int4Linear.__new__(Int4Linear)
        torch.nn.Module.__init__(lin)
        lin.shape, lin.group_size, lin.dtype, lin.path = proto.shape, proto.group_size, proto.dtype, proto.path
        for name, b in proto._buffers.items():
            lin.register_buffer(name, b.clone())
        return lin

    for layer in model.layers:
        if layer.is_moe:
            experts = [
                QuantizedExpert(*(copy(protos[p]) for p in ("gate", "up", "down"))) for _ in range(cfg.num_experts)
            ]
            layer.feed_forward.experts = QuantizedExperts(experts)
    return protos["gate"].path


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device) -> float | None:
    """GPU memory at its peak since reset_peak, GB (the model's weights included)."""
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=2048, help="also time one prefill this long")
    ap.add_argument("--bf16-attention", action="store_true", help="attention projections bf16 (default: INT4)")
    ap.add_argument("--ways", default="eager,static,graph,graph_plain", help="decode ways to time, in order")
    ap.add_argument("--profile", default="", help="write a kernel table of 4 graph replays here (CUDA)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    cfg = scout_config(args.small)
    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype, int4_attention=not args.bf16_attention)
    path = resident_experts(model, device, dtype)
    sync(device)
    n, p = args.gen_tokens, args.prompt_tokens
    prompt = torch.randint(0, cfg.vocab_size, (p,), generator=torch.Generator().manual_seed(2)).to(device)
    feed = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(3)).tolist()
    head = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "int4_path": path,
        "attention": "bf16" if args.bf16_attention else "int4",
        "build_s": round(time.perf_counter() - t0, 1),
        "prompt": p,
        "gen": n,
    }
    if device.type == "cuda":
        head["gpu_GB"] = round(torch.cuda.memory_allocated() / 1e9, 1)
    print(json.dumps(head), flush=True)

    def eager():
        cache = model.new_cache(p + n)
        model(prompt, cache)
        sync(device)
        t = time.perf_counter()
        out = []
        for tok in feed:
            out.append(model(torch.tensor([tok], device=device), cache))
            int(out[-1][-1].argmax())  # the host reads a token every step, as sampling does
        sync(device)
        return time.perf_counter() - t, torch.cat(out)

    def static(graph: bool):
        cache = model.new_cache(p + n)
        model(prompt, cache)
        step = stepper(model, cache, "graph" if graph else "static")  # a graph is captured here
        sync(device)
        t = time.perf_counter()
        out = []
        for tok in feed:
            out.append(step(tok).clone())
            int(out[-1][-1].argmax())
        sync(device)
        return time.perf_counter() - t, torch.cat(out)

    long = torch.randint(0, cfg.vocab_size, (args.prefill_tokens,), generator=torch.Generator().manual_seed(4))
    long = long.to(device)

    def prefill(chunk: int) -> float:
        cache = model.new_cache(args.prefill_tokens)
        sync(device)
        t = time.perf_counter()
        for i in range(0, args.prefill_tokens, chunk):
            model(long[i : i + chunk], cache)
        sync(device)
        return time.perf_counter() - t

    grouped = [None]
    if path == "triton":  # the grouped MoE kernels up to triton_moe.MAX_TOKENS (default), never, always
        from quant import triton_moe

        grouped = [triton_moe.MAX_TOKENS, 0, 1 << 30]
    for chunk in sorted({args.prefill_tokens, 512}, reverse=True):  # one forward; the CLI's chunks
        for limit in grouped:
            if limit is not None:
                triton_moe.MAX_TOKENS = limit
            prefill(chunk)  # the first builds kernels and stacks
            reset_peak(device)
            dt = min(prefill(chunk) for _ in range(2))
            row = {
                "way": "prefill",
                "tokens": args.prefill_tokens,
                "chunk": chunk,
                "tok_s": round(args.prefill_tokens / dt, 1),
                "peak_GB": peak_gb(device),
            }
            if limit is not None:
                row["grouped_max_tokens"] = limit
            print(json.dumps(row), flush=True)
        if path == "triton":
            triton_moe.MAX_TOKENS = grouped[0]
        # attention with K/V repeated per query head (LLAMA4_LOCAL_SDPA_EXPAND): CUDA's
        # memory-efficient kernel instead of the math one, which materializes the scores
        os.environ["LLAMA4_LOCAL_SDPA_EXPAND"] = "1"
        try:
            prefill(chunk)
            reset_peak(device)
            dt = min(prefill(chunk) for _ in range(2))
        finally:
            del os.environ["LLAMA4_LOCAL_SDPA_EXPAND"]
        row = {"way": "prefill", "tokens": args.prefill_tokens, "chunk": chunk, "sdpa": "expanded"}
        print(json.dumps(row | {"tok_s": round(args.prefill_tokens / dt, 1), "peak_GB": peak_gb(device)}), flush=True)

    def plain_graph():  # the graph without fused.py's compiled regions
        os.environ["LLAMA4_LOCAL_COMPILE"] = "0"
        try:
            return static(True)
        finally:
            del os.environ["LLAMA4_LOCAL_COMPILE"]

    def q6_graph():  # the graph with the lm_head in Q6 (quant/triton_q6.py): random blocks, timing only
        from quant.head import Q6Linear

        kept = model.lm_head
        model.lm_head = Q6Linear(random_q6(cfg.vocab_size, cfg.hidden_size, device), cfg.hidden_size, dtype)
        try:
            return static(True)
        finally:
            model.lm_head = kept

    table = {
        "eager": eager,
        "static": lambda: static(False),
        "graph": lambda: static(True),
        "graph_plain": plain_graph,
        "graph_q6": q6_graph,
    }
    ways = [w for w in args.ways.split(",") if device.type == "cuda" or not w.startswith("graph")]
    ref = None
    for name in ways:
        fn = table[name]
        fn()  # warm-up (and capture) costs are not a step's
        dt, logits = fn()
        row = {"way": name, "tok_s": round(n / dt, 2), "ms_per_token": round(dt / n * 1e3, 2)}
        if ref is None:
            ref = logits
        else:
            row["rel_err_vs_first"] = float((logits.float() - ref).norm() / ref.norm())
        print(json.dumps(row), flush=True)
    if args.profile and device.type == "cuda":
        profile_graph(model, prompt, feed, args.profile)


def profile_graph(model, prompt, feed, out: str) -> None:
    """The kernels of a few graph replays, by total CUDA time, into `out` (a text table)."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache(prompt.shape[0] + len(feed))
    model(prompt, cache)
    step = stepper(model, cache, "graph")
    step(feed[0])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for tok in feed[1:5]:
            step(tok)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    Path(out).write_text(table)
    print(json.dumps({"profile": out, "replays": 4}), flush=True)


if __name__ == "__main__":
    main()

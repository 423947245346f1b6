"""Decode of a Scout-shaped INT4 model with every expert resident: eager steps against static
steps (llama4_local/graph_decode.py) and their CUDA-graph replay, in one run.

The model is bench_offload_gpu.py's (48 layers, Scout's shapes, random INT4 experts of
3 x 5120 x 8192 at group 128, INT4 shared experts, bf16 attention and lm_head), with the routed
experts resident as QuantizedExperts (each expert its own copy of one random expert's buffers):
about 51 GB of experts, for an 80 GB-class GPU. Reports tok/s for each way, host syncs avoided,
and how far the replayed logits are from the eager ones (fed the same tokens); and one 2048-token
prefill (with Triton INT4, through the grouped MoE kernels of quant/triton_moe.py).

    python benchmarks/bench_graph_decode.py                  # CUDA, 80 GB-class GPU
    LLAMA4_LOCAL_CUDA_INT4=triton python benchmarks/bench_graph_decode.py   # Triton kernels
    python benchmarks/bench_graph_decode.py --small --device cpu   # a smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_offload_gpu import build_model, random_int4, scout_config  # noqa: E402

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
    args = ap.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    cfg = scout_config(args.small)
    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype)
    path = resident_experts(model, device, dtype)
    sync(device)
    n, p = args.gen_tokens, args.prompt_tokens
    prompt = torch.randint(0, cfg.vocab_size, (p,), generator=torch.Generator().manual_seed(2)).to(device)
    feed = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(3)).tolist()
    head = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "int4_path": path,
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
    for _ in range(2):  # the first builds kernels and stacks (Triton: grouped MoE kernels)
        cache = model.new_cache(args.prefill_tokens)
        sync(device)
        t = time.perf_counter()
        model(long, cache)
        sync(device)
        dt = time.perf_counter() - t
    print(json.dumps({"way": "prefill", "tokens": args.prefill_tokens, "tok_s": round(args.prefill_tokens / dt, 1)}))

    ways = [("eager", eager), ("static", lambda: static(False))]
    if device.type == "cuda":
        ways.append(("cuda_graph", lambda: static(True)))
    ref = None
    for name, fn in ways:
        fn()  # warm-up (and capture) costs are not a step's
        dt, logits = fn()
        row = {"way": name, "tok_s": round(n / dt, 2), "ms_per_token": round(dt / n * 1e3, 2)}
        if ref is None:
            ref = logits
        else:
            row["rel_err_vs_eager"] = float((logits.float() - ref).norm() / ref.norm())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

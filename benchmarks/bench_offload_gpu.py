"""Offloaded decode and prefill of a Scout-shaped INT4 model built in memory.

48 layers, 16 experts of 3 x 5120 x 8192 per layer as random INT4 (group 128, symmetric), the
shared experts and attention projections INT4 as the default quantize makes them
(`--bf16-attention` keeps those bf16), embeddings/lm_head bf16, Scout's real shapes: about 55 GB,
built directly in memory (never through disk). Where a budget's plan leaves experts off the GPU
the run does what a loaded checkpoint does: embeddings in host RAM, the lm_head read in Q6
(random blocks, as a default quantize's sidecar would give them). For each setup it reports prefill and decode
tok/s, the cache hit rate, prefetch accuracy, bytes moved and the host-to-device bandwidth the
copies reached against the measured peak of one large pinned copy.

Setups: --gpu-memory 24GiB with miss policies swap, cpu and auto, each with and without
prefetch; and 80GiB (clamped to what the GPU has), where every expert may fit.

Routing: `--routing random` (default) picks every token's experts uniformly at random, the
worst case for the cache (and the prefetch guess, which reads the router, is right by chance
only); `--routing model` lets the random model's routers choose, which on Scout's 48 layers
sends a layer's decode tokens to one expert (an H200 run, 2026-12-04: decode hit rate 1.0 at
176 of 768 slots), so it flatters the cache. Traces of the trained model
(bench_offload_policies.py) show the locality real models have. Decode feeds random tokens
(greedy decoding of random weights repeats one token).

    python benchmarks/bench_offload_gpu.py                   # needs a GPU with ~24+ GB and ~110 GB RAM
    python benchmarks/bench_offload_gpu.py --small --device cpu   # a smoke run of the same code

On a CPU, `--layers N --slots 16N --miss-policies swap --budgets 0` times Scout's first N
layers at full size with every expert resident: CPU-only decode per layer, to extrapolate to 48.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama4_local.config import TextConfig, read_json  # noqa: E402
from llama4_local.graph_decode import stepper  # noqa: E402
from llama4_local.model import Llama4Text, rope_inv_freq  # noqa: E402
from offload.cache import ExpertCache, HostStore  # noqa: E402
from offload.layout import ExpertKernel, ExpertLayout  # noqa: E402
from offload.manager import OffloadManager  # noqa: E402
from offload.plan import GiB, Quantized, plan_memory  # noqa: E402
from offload.policy import make_policy  # noqa: E402
from offload.setup import replace_experts  # noqa: E402
from quant import q6  # noqa: E402
from quant.head import Q6Linear  # noqa: E402
from quant.int4 import Int4Weight  # noqa: E402
from quant.kernels import Int4Linear, kernel_for  # noqa: E402

GROUP = 128


def scout_config(small: bool, layers: int | None = None) -> TextConfig:
    raw = read_json(ROOT / "tests" / "data" / "scout-instruct-config.json")
    cfg = TextConfig.from_hf(raw)
    if layers:  # Scout's first `layers` layers, at full size (for per-layer timings on small machines)
        cfg = replace(
            cfg,
            num_layers=layers,
            rope_layers=cfg.rope_layers[:layers],
            chunked_layers=cfg.chunked_layers[:layers],
            moe_layers=cfg.moe_layers[:layers],
        )
    if small:  # same structure, ~1/10 of every dimension, 4 layers
        n = 4
        cfg = replace(
            cfg,
            vocab_size=8192,
            hidden_size=512,
            intermediate_size=1024,
            num_layers=n,
            num_heads=8,
            num_kv_heads=2,
            head_dim=64,
            rope_layers=cfg.rope_layers[:n],
            chunked_layers=cfg.chunked_layers[:n],
            moe_layers=cfg.moe_layers[:n],
        )
    return cfg


def random_int4(n: int, k: int, gen: torch.Generator) -> Int4Weight:
    packed = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, generator=gen)
    scale = torch.rand(n, k // GROUP, generator=gen, dtype=torch.float32).mul(0.004).add(0.001).bfloat16()
    return Int4Weight(packed, scale, None, (n, k), GROUP)


def build_model(cfg: TextConfig, device: torch.device, dtype: torch.dtype, int4_attention: bool = True) -> Llama4Text:
    """Random non-expert weights on the device (shared experts INT4, and the attention projections
    unless `int4_attention` is False: the default quantize makes both INT4); routed experts left out."""
    gen = torch.Generator().manual_seed(0)
    model = Llama4Text(cfg)
    replace_experts(model)
    for name, p in list(model.named_parameters()):
        if ".shared_expert." in name:
            continue  # replaced by INT4 linears below
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=dtype, device=device)
        else:
            t = (torch.randn(p.shape, dtype=dtype, device=device) * 0.02).to(dtype)
        setattr(mod, attr, torch.nn.Parameter(t, requires_grad=False))
    d, i = cfg.hidden_size, cfg.intermediate_size
    for layer in model.layers:
        if int4_attention:
            attn = layer.self_attn
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                n, k = getattr(attn, proj).weight.shape
                setattr(attn, proj, Int4Linear(random_int4(n, k, gen), device, dtype))
        if layer.is_moe:
            sh = layer.feed_forward.shared_expert
            for proj, (n, k) in (("gate_proj", (i, d)), ("up_proj", (i, d)), ("down_proj", (d, i))):
                setattr(sh, proj, Int4Linear(random_int4(n, k, gen), device, dtype))
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


def random_q6(n: int, k: int, device) -> torch.Tensor:
    """Packed Q6 rows (quant/q6.py's layout: an lm_head's sidecar) of random integers, every scale 2^-7."""
    rb = q6.row_bytes(k)
    packed = torch.randint(0, 256, (n, rb // q6.SUPER_BYTES, q6.SUPER_BYTES), dtype=torch.uint8, device=device)
    packed[..., 96:] = torch.tensor([0, 0x20] * 4, dtype=torch.uint8, device=device)
    return packed.reshape(n, rb)


def random_routing(model, seed: int = 4) -> None:
    """Every MoE layer routes each token to experts drawn uniformly at random (on the device, so
    no host sync is added), with sigmoid score 0.5."""
    dev = model.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    for layer in model.layers:
        if layer.is_moe:
            ff = layer.feed_forward

            def route(x, ff=ff):  # top-k of uniform noise: k distinct experts, uniformly
                noise = torch.rand(x.shape[0], ff.num_experts, device=x.device, generator=gen)
                idx = noise.topk(ff.top_k, dim=1).indices
                return idx, torch.full(idx.shape, 0.5, dtype=x.dtype, device=x.device)

            ff.route = route


def expert_tensors(cfg: TextConfig, device: torch.device, dtype: torch.dtype):
    """One random expert in `device`'s kernel layout (on the CPU), reused for every expert's block."""
    gen = torch.Generator().manual_seed(1)
    d, i = cfg.hidden_size, cfg.intermediate_size
    out, path = {}, None
    for p, (n, k) in (("gate", (i, d)), ("up", (i, d)), ("down", (d, i))):
        qw = random_int4(n, k, gen)
        path = kernel_for(qw, device, dtype)
        lin = Int4Linear(qw, device, dtype, path=path)
        out.update({f"{p}.{name}": b.to("cpu") for name, b in lin.tensors().items()})
    return out, ExpertKernel(path, GROUP)


def pinned_h2d(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(4):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_setup(model, device, prompt_tokens: int, gen_tokens: int, mode: str = "eager") -> dict:
    """Prefill, then decode in `mode` (graph_decode.stepper's: eager, static or graph; with an
    expert cache static and graph are piecewise_decode's steps)."""
    cache = model.new_cache(prompt_tokens + gen_tokens)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.cfg.vocab_size, (prompt_tokens,), generator=gen).to(device)
    m = model.offload
    res = {}
    m.reset_stats()
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    logits = model(ids, cache)
    int(logits[-1].argmax())
    sync(device)
    dt = time.perf_counter() - t
    res["prefill"] = dict(tok_s=round(prompt_tokens / dt, 2), **busy(c, dt), **phase_stats(m))
    m.reset_stats()
    # Decode feeds random tokens (the argmax still syncs, as sampling does): greedy decoding of
    # random weights repeats one token, so every step would route to the same experts.
    feed = torch.randint(0, model.cfg.vocab_size, (gen_tokens,), generator=gen).tolist()
    step = stepper(model, cache, mode)  # captures its graphs here, outside the timing
    sync(device)
    m.reset_stats()
    t, c = time.perf_counter(), time.process_time()
    for i in range(gen_tokens):
        logits = model(torch.tensor([feed[i]], device=device), cache) if step is None else step(feed[i])
        int(logits[-1].argmax())  # syncs, as sampling does
    sync(device)
    dt = time.perf_counter() - t
    res["decode"] = dict(tok_s=round(gen_tokens / dt, 3), mode=mode, **busy(c, dt), **phase_stats(m))
    return res


def busy(cpu0: float, wall: float) -> dict:
    """The host's CPU time over the wall time since cpu0 (time.process_time): how many of its
    cores the phase kept busy on average: the main thread's launches and waits count, and so do
    OpenMP workers spinning for a while after each parallel region (the CPU misses' kernel)."""
    return {"host_cores_busy": round((time.process_time() - cpu0) / wall, 2)}


def profile_decode(model, device, steps: int) -> dict:
    """Where a decode step's time goes when nothing is copied: host time per step, device time
    per step, kernel launches per step and the operators that take the most host time."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache(64 + steps)
    ids = torch.arange(64, device=device)
    tok = int(model(ids, cache)[-1].argmax())
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            tok = int(model(torch.tensor([tok], device=device), cache)[-1].argmax())
        sync(device)
    wall = (time.perf_counter() - t) / steps
    events = prof.key_averages()
    dev_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "cudaMemcpyAsync")
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "wall_ms_per_step_profiled": round(wall * 1e3, 2),
        "device_ms_per_step": round(dev_us / steps / 1e3, 3),
        "launches_per_step": round(launches / steps, 1),
        "sync_or_memcpy_per_step": round(syncs / steps, 1),
        "top_host_ops_us_per_step": {e.key: round(e.self_cpu_time_total / steps, 1) for e in top},
    }


def phase_stats(m) -> dict:
    t = m.totals()
    return {
        "hit_rate": round(t.hit_rate, 4) if t.uses else None,
        "cpu_misses": t.cpu,
        "prefetch_accuracy": round(t.prefetch_accuracy, 4) if t.prefetch_guessed else None,
        "GB_moved": round(t.bytes_moved / 1e9, 3),
        "h2d_GB_s": round(t.h2d_bytes_per_s / 1e9, 2) if t.copy_s else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--small", action="store_true", help="a scaled-down model (for a CPU smoke run)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--budgets", default="24,80", help="GiB, comma-separated")
    ap.add_argument("--miss-policies", default="swap,cpu,auto")
    ap.add_argument("--slots", type=int, default=0, help="with --device cpu: cache slots (no GPU plan)")
    ap.add_argument("--layers", type=int, default=0, help="only Scout's first N layers (full size)")
    ap.add_argument("--long-prompt", type=int, default=2048, help="also a prefill this long where all is resident")
    ap.add_argument("--profile-steps", type=int, default=8, help="profile this many decode steps where all is resident")
    ap.add_argument("--routing", default="random", choices=["random", "model"])
    ap.add_argument("--bf16-attention", action="store_true", help="attention projections bf16 (default: INT4)")
    ap.add_argument("--decode-modes", default="eager,graph", help="offloaded decode: eager and/or piecewise graph")
    ap.add_argument("--host-rows", type=int, default=0, help="hold this many experts in host RAM (0: all)")
    ap.add_argument("--inclusive-host", action="store_true", help="with --host-rows: RAM keeps the GPU's experts too")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    cfg = scout_config(args.small, args.layers or None)
    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype, int4_attention=not args.bf16_attention)
    if args.routing == "random":
        random_routing(model)
    dev_tensors, kernel = expert_tensors(cfg, device, dtype)
    layout = ExpertLayout(dev_tensors)
    keys = [(i, e) for i in range(cfg.num_layers) if cfg.moe_layers[i] for e in range(cfg.num_experts)]
    t_model = time.perf_counter() - t0
    held = args.host_rows or None  # bounded: the rest "read from disk" (here a copy from RAM)
    budget, policy = (held * layout.nbytes, make_policy("lru")) if held else (None, None)
    store = HostStore(layout, keys, lambda k: dev_tensors, device.type == "cuda", budget, policy)
    store.exclusive = store.policy is not None and not args.inclusive_host
    t_store = time.perf_counter() - t0 - t_model
    cpu_store, cpu_kernel = store, kernel
    if device.type == "cuda" and set(args.miss_policies.split(",")) - {"swap"}:
        cpu_tensors, cpu_kernel = expert_tensors(cfg, torch.device("cpu"), dtype)
        if ExpertLayout(cpu_tensors).entries != layout.entries:  # stock CUDA kernel: a second copy
            cpu_store = HostStore(ExpertLayout(cpu_tensors), keys, lambda k: cpu_tensors, pin=False)
    peak = pinned_h2d(device)
    head = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "kernel": kernel.quant_path,
        "routing": args.routing,
        "attention": "bf16" if args.bf16_attention else "int4",
        "threads": torch.get_num_threads(),
        "experts": len(keys),
        "expert_MB": round(layout.nbytes / 1e6, 2),
        "host_store_GB": round(store.nbytes / 1e9, 2),
        "pinned_h2d_peak_GB_s": round(peak / 1e9, 2) if peak else None,
        "build_s": round(time.perf_counter() - t0, 1),
        "model_build_s": round(t_model, 1),
        "pinned_store_build_s": round(t_store, 1),
        "gpu_layout_equals_cpu_layout": cpu_store is store,
        "host_rows": held,
        "host_tier": None if not held else "exclusive" if store.exclusive else "inclusive",
    }
    print(json.dumps(head), flush=True)
    warmed, bf16, head_q6 = False, model.lm_head, None
    for gib in [int(b) for b in args.budgets.split(",")]:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info()
            used_now = torch.cuda.memory_allocated()
            budget = min(gib * GiB, free + used_now - GiB)
            d = cfg.hidden_size
            head = cfg.vocab_size * q6.row_bytes(d)  # the default quantize's Q6 sidecar
            q = Quantized(GROUP, attention=not args.bf16_attention)  # what build_model made
            plan = plan_memory(cfg, budget, args.prompt_tokens + args.gen_tokens, 2, q, head_q6=head)
            slots, head_q6 = plan.slots, plan.head_q6
            # Where the plan keeps the embeddings in host RAM and reads the head in Q6 (not every
            # expert fits), so does the run (the Q6 head's blocks random, as every weight here).
            where = "cpu" if "embeddings" in plan.host_dense else device
            model.embed_tokens.weight = torch.nn.Parameter(model.embed_tokens.weight.to(where), requires_grad=False)
            model.lm_head = Q6Linear(random_q6(cfg.vocab_size, d, device), d, torch.bfloat16) if plan.head_q6 else bf16
        else:
            slots = args.slots or len(keys) // 5
        for miss in args.miss_policies.split(","):
            for prefetch in (True, False):
                cache = ExpertCache(store, slots, device, make_policy("lru"))
                cs = cpu_store if miss != "swap" else store
                model.offload = OffloadManager(model, cache, kernel, cs, cpu_kernel, miss, prefetch)
                if not warmed:  # CUDA context, cuBLAS handles, first-shape costs: not the setup's
                    run_setup(model, device, 32, 2)
                    warmed = True
                res = run_setup(model, device, args.prompt_tokens, args.gen_tokens)
                row = {"gpu_memory_GiB": gib, "slots": slots, "miss_policy": miss, "prefetch": prefetch}
                row.update(embeddings=str(model.embed_tokens.weight.device), head_q6=head_q6, **res)
                for mode in args.decode_modes.split(","):
                    if mode != "eager":
                        row[f"decode_{mode}"] = run_setup(model, device, 16, args.gen_tokens, mode)["decode"]
                if slots >= len(keys) and prefetch and args.long_prompt:
                    long = run_setup(model, device, args.long_prompt, 2)
                    row[f"prefill_{args.long_prompt}"] = long["prefill"]["tok_s"]
                if slots >= len(keys) and prefetch and args.profile_steps:
                    row["decode_profile"] = profile_decode(model, device, args.profile_steps)
                if model.offload.cost:
                    row["cost_model_ms"] = model.offload.cost.as_dict()
                print(json.dumps(row), flush=True)
                model.offload = None
                del cache
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if slots >= len(keys):
                break  # everything resident: the miss policy never acts


if __name__ == "__main__":
    main()

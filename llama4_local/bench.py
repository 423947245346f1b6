"""`llama4-local bench`: prefill and decode speed, memory and expert-cache figures of one setup.

The prompt is random token ids (seeded), so a run needs no text and is repeatable; decoding is
greedy. Prefill and decode are timed separately, and the expert-cache statistics are reset
between them so each phase reports its own hit rate, prefetch accuracy and bytes moved.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import fused
from .errors import UserError
from .generate import prefill
from .graph_decode import CudaGraphDecode, stepper
from .loader import load_model


@dataclass
class BenchRequest:
    model: Path
    prompt_tokens: int = 128
    gen_tokens: int = 64
    dtype: str = "bfloat16"
    device: str = "auto"
    prefill_chunk: int = 512
    offload: object | None = None  # offload.setup.OffloadOptions
    seed: int = 0
    int8_attention: bool = False  # CPU bf16 runs: attention rounded to INT8 at load
    mmap: bool | None = True  # False/None: CPU weights copied out of the mapped files (loader.load_model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _phase(model, seconds: float, tokens: int) -> dict:
    out = {"tokens": tokens, "seconds": round(seconds, 4), "tok_s": round(tokens / seconds, 2) if seconds else None}
    if model.offload is not None:
        t = model.offload.totals()
        out["expert_cache"] = t.as_dict()
        bw = t.h2d_bytes_per_s
        out["expert_cache"]["h2d_gb_s"] = round(bw / 1e9, 2) if bw else None
    return out


def run_bench(req: BenchRequest) -> dict:
    if req.prompt_tokens < 1 or req.gen_tokens < 1:
        raise UserError("--prompt-tokens and --gen-tokens must be at least 1")
    t0 = time.perf_counter()
    context = req.prompt_tokens + req.gen_tokens
    model, cfg = load_model(
        req.model,
        req.dtype,
        req.device,
        req.offload,
        context,
        req.prefill_chunk,
        int8_attention=req.int8_attention,
        mmap=req.mmap,
    )
    load_s = time.perf_counter() - t0
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(req.seed)
    ids = torch.randint(0, cfg.vocab_size, (req.prompt_tokens,), generator=gen).to(device)
    cache = model.new_cache(req.prompt_tokens + req.gen_tokens)
    if model.offload is not None:
        model.offload.reset_stats()
    _sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache, req.prefill_chunk)
    token = int(logits.argmax())
    _sync(device)
    pre = _phase(model, time.perf_counter() - t0, req.prompt_tokens)
    if model.offload is not None:
        model.offload.reset_stats()
    t0 = time.perf_counter()
    step = stepper(model, cache)  # None: the eager forward (LLAMA4_LOCAL_DECODE; a graph captures here)
    _sync(device)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(req.gen_tokens - 1):
        if step is None:
            logits = model(torch.tensor([token], device=device), cache)[-1]
        else:
            logits = step(token)[-1]
        token = int(logits.argmax())  # greedy; reading the token syncs like a real decode loop
    _sync(device)
    dec = _phase(model, time.perf_counter() - t0, req.gen_tokens - 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {
        "model": str(req.model),
        "device": str(device),
        "dtype": req.dtype,
        "load_s": round(load_s, 2),
        "prefill": pre,
        "decode": dec,
        "peak_rss_bytes": rss,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "kv_cache_bytes": cache.nbytes(),
        "decode_mode": _mode_name(step),
        "compiled_regions": step is not None and fused._wanted(torch.empty(0, device=device)),
        "int4_kernels": _int4_kernels(model),
        "decode_setup_s": round(setup_s, 3),
    }
    if model.offload is not None:
        s = model.offload.summary()
        out["offload"] = {k: s[k] for k in ("slots", "experts", "slot_bytes", "policy", "miss_policy", "prefetch")}
        out["offload"]["host_held"] = s["host_held"]
        out["offload"]["cost_model"] = s["cost_model"]
    if model.plan is not None:
        out["plan"] = model.plan.as_dict()
    return out


def _mode_name(step) -> str:
    """How the decode steps ran: eager, static, graph, or piecewise (graph) with an expert cache."""
    from .piecewise_decode import PiecewiseDecode

    if step is None:
        return "eager"
    if isinstance(step, PiecewiseDecode):
        return "piecewise graph" if step.graphs is not None else "piecewise"
    return "graph" if isinstance(step, CudaGraphDecode) else "static"


def _int4_kernels(model) -> list[str]:
    """The INT4 kernel paths the model's resident linears take (quant.kernels.kernel_for)."""
    from quant.kernels import Int4Linear

    return sorted({m.path for m in model.modules() if isinstance(m, Int4Linear)})

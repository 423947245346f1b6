"""Prefill and decode speed of this runner next to transformers, on one mid-sized checkpoint.

Builds a random checkpoint (hidden 1024, expert intermediate 1024, 8 layers, 8 query / 2 KV
heads of 128, 16 experts top-1, every layer MoE, qk-norm, llama3 scaling, vocab 32000) in the
Hugging Face layout, then times, in one run and for each dtype: prefill of 128 tokens and greedy
decode of 32 tokens by this runner and by transformers' Llama4ForCausalLM. It also measures the
machine's copy bandwidth (and what a float32 matrix-vector product streams) and reports how close
the runner's decode comes to the bandwidth limit (copy bandwidth / bytes of weights read per token).

    python benchmarks/bench_runner.py [--device cpu|cuda] [--dtypes float32,bfloat16] [--json FILE]

transformers is needed only here (pip install -e '.[test]'); the runner never imports it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tests.oracle_images import import_torchvision  # noqa: E402

import_torchvision()  # transformers imports torchvision; see tests/oracle_images.py

from timing import copy_bandwidth, matvec_bandwidth  # noqa: E402

from llama4_local.generate import generate_step  # noqa: E402
from llama4_local.loader import load_model  # noqa: E402
from llama4_local.sampling import Sampler, SamplingParams  # noqa: E402

CONFIG = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=1024,
    intermediate_size_mlp=2048,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=128,
    num_local_experts=16,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    use_qk_norm=True,
    attention_chunk_size=8192,
    max_position_embeddings=65536,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=16.0,
        low_freq_factor=1.0,
        high_freq_factor=1.0,
        original_max_position_embeddings=8192,
    ),
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bytes_per_decode_token(model) -> int:
    """Weights a decode step reads: everything but the embedding table (one row) and the
    routed experts nobody chose (top-k of E per MoE layer)."""
    cfg = model.cfg
    total = 0
    tensors = [*model.named_parameters(), *model.named_buffers()]  # INT4 linears hold buffers
    for name, p in tensors:
        if name.endswith("inv_freq"):
            continue
        n = p.numel() * p.element_size()
        if name == "embed_tokens.weight":
            n = p.shape[1] * p.element_size()
        elif ".experts." in name:
            n = n * cfg.top_k // cfg.num_experts
        total += n
    return total


def time_ours(path, dtype, device, prompt, n_new, reps, prepare=None):
    model, _ = load_model(path, dtype, device.type)
    if prepare is not None:
        prepare(model)
    sampler = Sampler(SamplingParams(temperature=0), device)
    best_pre, best_dec, tokens = float("inf"), float("inf"), None
    for _ in range(reps):
        cache = model.new_cache(len(prompt) + n_new)
        steps = generate_step(model, prompt, sampler, cache, prefill_chunk=512)
        t0 = time.perf_counter()
        out = [next(steps)]  # the prefill yields the first token (a .item() syncs)
        t1 = time.perf_counter()
        for _ in range(n_new - 1):
            out.append(next(steps))
        t2 = time.perf_counter()
        best_pre, best_dec, tokens = min(best_pre, t1 - t0), min(best_dec, t2 - t1), out
    return {
        "prefill_tok_s": len(prompt) / best_pre,
        "decode_tok_s": (n_new - 1) / best_dec,
        "tokens": tokens,
        "bytes_per_token": bytes_per_decode_token(model),
    }


@torch.inference_mode()
def time_transformers(path, dtype, device, prompt, n_new, reps):
    from transformers import Llama4ForCausalLM

    model = Llama4ForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    ids = torch.tensor([prompt], device=device)
    best_pre, best_dec, tokens = float("inf"), float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        nxt = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        past, got = out.past_key_values, [nxt]
        for _ in range(n_new - 1):
            out = model(input_ids=torch.tensor([[nxt]], device=device), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            got.append(nxt)
        t2 = time.perf_counter()
        best_pre, best_dec, tokens = min(best_pre, t1 - t0), min(best_dec, t2 - t1), got
    return {"prefill_tok_s": len(prompt) / best_pre, "decode_tok_s": (n_new - 1) / best_dec, "tokens": tokens}


def write_checkpoint(path: Path) -> None:
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    Llama4ForCausalLM(Llama4TextConfig(**CONFIG)).save_pretrained(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    info = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    bw = copy_bandwidth(device)
    info["copy_GB_s"] = round(bw / 1e9, 2)
    mv = matvec_bandwidth(device)
    info["matvec_GB_s"] = round(mv / 1e9, 2)
    print(json.dumps(info))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, CONFIG["vocab_size"], (args.prompt_tokens,), generator=g).tolist()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp))
        for dtype in args.dtypes.split(","):
            ours = time_ours(tmp, dtype, device, prompt, args.new_tokens, args.reps)
            row = {
                "dtype": dtype,
                "ours_prefill_tok_s": round(ours["prefill_tok_s"], 1),
                "ours_decode_tok_s": round(ours["decode_tok_s"], 1),
                "MB_per_token": round(ours["bytes_per_token"] / 1e6, 1),
                "bandwidth_limit_tok_s": round(bw / ours["bytes_per_token"], 1),
            }
            row["fraction_of_limit"] = round(ours["decode_tok_s"] / row["bandwidth_limit_tok_s"], 2)
            row["fraction_of_matvec_limit"] = round(ours["decode_tok_s"] * ours["bytes_per_token"] / mv, 2)
            if not args.skip_transformers:
                ref = time_transformers(tmp, dtype, device, prompt, args.new_tokens, max(1, args.reps - 1))
                row["hf_prefill_tok_s"] = round(ref["prefill_tok_s"], 1)
                row["hf_decode_tok_s"] = round(ref["decode_tok_s"], 1)
                row["decode_ratio"] = round(ours["decode_tok_s"] / ref["decode_tok_s"], 1)
                row["prefill_ratio"] = round(ours["prefill_tok_s"] / ref["prefill_tok_s"], 1)
                row["same_greedy_tokens"] = ours["tokens"] == ref["tokens"]
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()

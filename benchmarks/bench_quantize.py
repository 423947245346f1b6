"""Quantize throughput and peak memory on a checkpoint larger than the memory it should need.

Writes a random bf16 Llama 4 checkpoint in the Hugging Face layout (sharded, one shard per
layer, written layer by layer so writing it stays small too): hidden 1024, expert intermediate
2048, 16 experts per layer, 10 layers by default: about 2.2 GB. Then runs `llama4-local
quantize` on it in a child process that samples its own memory every 20 ms: peak RSS (which
counts pages of the memory-mapped source while they are mapped) and peak anonymous memory (what
the process itself allocated), for each shard size and mode asked: `default` is what `quantize`
does unasked (GPTQ over the bundled calibration text; a small BPE tokenizer is written into the
random checkpoint for it), `no-calibrate` the plain fit.

    python benchmarks/bench_quantize.py [--layers 10] [--shard-sizes 256MB,1GB] [--modes default,no-calibrate]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from scout_slice import write_weights  # noqa: E402

from tests.factory import write_tokenizer  # noqa: E402

# Runs the CLI in this process while a thread samples /proc/self/status; prints the peaks.
CHILD = """
import json, sys, threading, time
peak = {"rss_kib": 0, "anon_kib": 0}
def sample():
    while True:
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon"):
                key = "rss_kib" if k == "VmRSS" else "anon_kib"
                peak[key] = max(peak[key], int(v.split()[0]))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
sys.argv = ["llama4-local", *json.loads(sys.argv[1])]
import cli
try:
    cli.app()
except SystemExit as e:
    if e.code:
        raise
time.sleep(0.05)
print(json.dumps(peak))
"""


def write_checkpoint(out: Path, layers: int, hidden=1024, inter=2048, experts=16, vocab=32000) -> int:
    heads, kv, hd = 8, 2, 128
    cfg = {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "intermediate_size_mlp": 2 * inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "num_local_experts": experts,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 1,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
        "attention_chunk_size": 8192,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    return write_weights(out, cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--shard-sizes", default="256MB,1GB")
    ap.add_argument("--asymmetric", action="store_true")
    ap.add_argument("--modes", default="default,no-calibrate", help="default (GPTQ) and/or no-calibrate")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "src"
        size = write_checkpoint(src, args.layers)
        print(json.dumps({"checkpoint_GB": round(size / 1e9, 2), "threads": torch.get_num_threads()}), flush=True)
        write_tokenizer(src, vocab_size=2000)  # for the calibration text (ids far below the model's vocabulary)
        for mode, shard in itertools.product(args.modes.split(","), args.shard_sizes.split(",")):
            if mode not in ("default", "no-calibrate"):
                sys.exit(f"--modes: default or no-calibrate, not {mode!r}")
            out = Path(tmp) / f"out-{shard}"
            cli_args = ["quantize", str(src), str(out), "--shard-size", shard]
            if args.asymmetric:
                cli_args.append("--asymmetric")
            if mode == "no-calibrate":
                cli_args.append("--no-calibrate")
            cmd = [sys.executable, "-c", CHILD, json.dumps(cli_args)]
            t = time.perf_counter()
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            seconds = time.perf_counter() - t
            if r.returncode:
                sys.exit(r.stderr)
            mem = json.loads(r.stdout.strip().splitlines()[-1])
            out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            row = {
                "mode": mode,
                "shard_size": shard,
                "seconds": round(seconds, 1),
                "source_MB_s": round(size / seconds / 1e6, 1),
                "peak_rss_MB": round(mem["rss_kib"] / 1024, 1),
                "peak_anon_MB": round(mem["anon_kib"] / 1024, 1),
                "output_GB": round(out_bytes / 1e9, 3),
                "peak_rss_fraction_of_checkpoint": round(mem["rss_kib"] * 1024 / size, 3),
            }
            print(json.dumps(row), flush=True)
            shutil.rmtree(out)


if __name__ == "__main__":
    main()

"""Expert-cache policies on real routing: hit rates of LRU and LFU-with-decay next to Belady's optimum.

Records routing traces (`offload.trace.RoutingRecorder`, the same code as `--record-routing`)
from the small trained Llama 4 (benchmarks/train_small.py) reading its held-out text token by
token, as a decode does, and from a random-weight model of the same shape for contrast; then
replays each trace through each policy at several cache sizes. It also runs the offloaded model
itself (CPU cache) with and without speculative prefetch, to report how often the router-based
guess of the next layer's experts is right.

    python benchmarks/bench_offload_policies.py [--model benchmarks/.cache/small-llama4] [--tokens 2000]
    python benchmarks/bench_offload_policies.py --model benchmarks/.cache/small-maverick \
        --slots 32,64,128,192,256 --live-slots 64,128        # 128 experts on 4 of 8 layers
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.oracle_images import import_torchvision  # noqa: E402

import_torchvision()  # transformers imports torchvision; see tests/oracle_images.py

from llama4_local.loader import load_model  # noqa: E402
from llama4_local.tokenizer import Tokenizer  # noqa: E402
from offload.policy import LRU, LFUDecay, belady, replay  # noqa: E402
from offload.setup import OffloadOptions  # noqa: E402
from offload.trace import RoutingRecorder, access_groups, accesses, read_trace  # noqa: E402

DEFAULT_MODEL = ROOT / "benchmarks" / "small-llama4"


def decode_through(model, ids: list[int]) -> None:
    """Feed ids one at a time (a decode's access pattern), restarting the cache when full."""
    ctx = 1024
    cache = model.new_cache(ctx)
    for i, t in enumerate(ids):
        if i and i % ctx == 0:
            cache = model.new_cache(ctx)
        model(torch.tensor([t]), cache)


def record(model, ids: list[int], path: Path) -> list:
    rec = RoutingRecorder(path, model)
    decode_through(model, ids)
    rec.close()
    return read_trace(path)


def random_twin(model_dir: Path, out: Path) -> Path:
    """The same config with random weights (transformers' initialisation), saved next to the tokenizer."""
    import shutil

    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    cfg = Llama4TextConfig.from_pretrained(model_dir)
    Llama4ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, out / f)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--slots", default="4,8,16,24,32")
    ap.add_argument("--live-slots", default="8,16", help="cache sizes for the live runs with and without prefetch")
    args = ap.parse_args()
    tok = Tokenizer(args.model)
    text = (args.model / "eval.txt").read_text()
    ids = tok.encode(text, add_special_tokens=False)[: args.tokens]
    slots = [int(s) for s in args.slots.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"trained": args.model, "random": random_twin(args.model, tmp / "random")}
        for name, path in models.items():
            model, cfg = load_model(path, "float32", "cpu")
            rows = record(model, ids, tmp / f"{name}.csv")
            seq, groups = accesses(rows), access_groups(rows)
            n_experts = cfg.num_experts * sum(cfg.moe_layers)
            # How concentrated is routing? Share of uses taken by each layer's 4 favourite experts.
            counts = torch.zeros(cfg.num_layers, cfg.num_experts)
            for _, layer, ex in rows:
                for e in ex:
                    counts[layer, e] += 1
            moe = counts[torch.tensor(cfg.moe_layers)]
            ranked = moe.sort(dim=1, descending=True).values
            top4 = (ranked[:, :4].sum() / moe.sum()).item()
            # The same at any expert count: the share of each layer's favourite eighth.
            eighth = (ranked[:, : max(1, cfg.num_experts // 8)].sum() / moe.sum()).item()
            # How often does a token reuse the previous token's expert in the same layer?
            last: dict[int, tuple] = {}
            same = total = 0
            for _, layer, ex in rows:
                if layer in last:
                    same += len(set(ex) & set(last[layer]))
                    total += len(ex)
                last[layer] = ex
            print(
                json.dumps(
                    {
                        "model": name,
                        "tokens": len(ids),
                        "accesses": len(seq),
                        "experts": n_experts,
                        "top4_share": round(top4, 3),
                        "top_eighth_share": round(eighth, 3),
                        "repeat_previous": round(same / total, 3),
                    }
                )
            )
            for s in slots:
                row = {"model": name, "slots": s, "fraction": round(s / n_experts, 3)}
                for pname, pol in (("lru", LRU()), ("lfu", LFUDecay())):
                    row[pname] = round(replay(groups, s, pol) / len(seq), 4)
                row["belady"] = round(belady(seq, s) / len(seq), 4)
                print(json.dumps(row), flush=True)
            # The live cache with and without prefetch: hit rate and how often the guess is right.
            for s in [int(v) for v in args.live_slots.split(",")]:
                for prefetch in (False, True):
                    opts = OffloadOptions(slots=s, miss_policy="swap", prefetch=prefetch)
                    m, _ = load_model(path, "float32", "cpu", offload=opts)
                    decode_through(m, ids[:500])
                    t = m.offload.totals()
                    print(
                        json.dumps(
                            {
                                "model": name,
                                "live_slots": s,
                                "prefetch": prefetch,
                                "hit_rate": round(t.hit_rate, 4),
                                "prefetch_accuracy": round(t.prefetch_accuracy, 4) if t.prefetch_guessed else None,
                            }
                        ),
                        flush=True,
                    )


if __name__ == "__main__":
    main()

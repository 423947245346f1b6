"""A slice of Scout at its real layer widths, written tensor by tensor in the Hugging Face layout.

Scout Instruct's published config (tests/data/scout-instruct-config.json) with fewer layers and
experts and a small vocabulary, so the lm_head does not dominate: hidden 5120, 40 query / 8 KV
heads of 128, experts and the shared expert 5120 x 8192, qk-norm, llama3 RoPE scaling, a NoPE
layer every fourth, every layer MoE. With the defaults (4 layers, 4 experts, vocab 600) that is
2.77 B parameters, 5.5 GB in bf16. Random weights (normal, std 0.02): for speed, not quality.

One shard per layer, each written and dropped before the next, so writing never holds more than
one layer in memory.

    python benchmarks/scout_slice.py OUT [--layers 4] [--experts 4] [--vocab 600] [--hidden 5120]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.factory import SPECIALS, write_tokenizer  # noqa: E402

SCOUT = ROOT / "tests" / "data" / "scout-instruct-config.json"


def slice_config(ids: dict[str, int], layers: int, experts: int, vocab: int, hidden: int | None = None) -> dict:
    cfg = json.loads(SCOUT.read_text())["text_config"]
    cfg.update(
        architectures=["Llama4ForCausalLM"],
        num_hidden_layers=layers,
        num_local_experts=experts,
        vocab_size=vocab,
        moe_layers=list(range(layers)),
        no_rope_layers=cfg["no_rope_layers"][:layers],
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]],
        pad_token_id=ids["<|finetune_right_pad|>"],
        tie_word_embeddings=False,
        attn_temperature_tuning=True,  # published as 4; transformers 5 (llama.cpp's converter reads it) wants a bool
    )
    if hidden is not None:  # a narrower model of the same shape, for quick tries
        scale = hidden / cfg["hidden_size"]
        heads = max(1, round(cfg["num_attention_heads"] * scale))
        kv = max(1, round(cfg["num_key_value_heads"] * scale))
        while heads % kv:
            kv -= 1
        cfg.update(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            intermediate_size=int(cfg["intermediate_size"] * scale),
            intermediate_size_mlp=int(cfg["intermediate_size_mlp"] * scale),
        )
    return cfg


def layer_tensors(cfg: dict, i: int, gen: torch.Generator, std: float) -> dict[str, torch.Tensor]:
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    q, kv, e, inter = (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["num_local_experts"],
        cfg["intermediate_size"],
    )

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p + "self_attn.q_proj.weight": rand(q * hd, h),
        p + "self_attn.k_proj.weight": rand(kv * hd, h),
        p + "self_attn.v_proj.weight": rand(kv * hd, h),
        p + "self_attn.o_proj.weight": rand(h, q * hd),
        p + "feed_forward.router.weight": rand(e, h),
        p + "feed_forward.experts.gate_up_proj": rand(e, h, 2 * inter),
        p + "feed_forward.experts.down_proj": rand(e, inter, h),
        p + "feed_forward.shared_expert.gate_proj.weight": rand(inter, h),
        p + "feed_forward.shared_expert.up_proj.weight": rand(inter, h),
        p + "feed_forward.shared_expert.down_proj.weight": rand(h, inter),
    }


def write_weights(out: Path, cfg: dict, seed: int = 0) -> int:
    """A random bf16 checkpoint of `cfg`'s shapes (every layer MoE) into `out`: one shard per layer
    and one for embeddings, norm and lm_head, each written and dropped before the next; the index
    too. Returns the bytes of weights written."""
    gen = torch.Generator().manual_seed(seed)
    std, h, vocab, layers = (
        cfg.get("initializer_range", 0.02),
        cfg["hidden_size"],
        cfg["vocab_size"],
        cfg["num_hidden_layers"],
    )
    weight_map, total = {}, 0
    shards = [f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors" for i in range(layers + 1)]
    for i in range(layers + 1):
        if i < layers:
            tensors = layer_tensors(cfg, i, gen, std)
        else:
            tensors = {
                "model.embed_tokens.weight": (torch.randn(vocab, h, generator=gen) * std).to(torch.bfloat16),
                "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                "lm_head.weight": (torch.randn(vocab, h, generator=gen) * std).to(torch.bfloat16),
            }
        save_file(tensors, str(out / shards[i]), metadata={"format": "pt"})
        weight_map.update({name: shards[i] for name in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def write_slice(
    out: Path, layers: int = 4, experts: int = 4, vocab: int = 600, hidden: int | None = None, seed: int = 0
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(out, vocab_size=vocab - len(SPECIALS))
    cfg = slice_config(ids, layers, experts, vocab, hidden)
    write_weights(out, cfg, seed)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=600)
    ap.add_argument("--hidden", type=int, default=None, help="narrower than Scout's 5120, same shape")
    args = ap.parse_args()
    path = write_slice(args.out, args.layers, args.experts, args.vocab, args.hidden)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

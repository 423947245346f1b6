"""Train a small Llama 4 on Python's own docstrings, for measuring quantization and routing.

Random weights say little about quantization quality (their outputs are near-uniform) or about
expert locality (they route almost uniformly). This script trains a few-million-parameter
Llama 4 with the architecture's own layer kinds: every layer MoE with 16 routed experts (top-1,
sigmoid-scaled input) and a shared expert, chunked attention on RoPE layers with the llama3
frequency scaling, a NoPE layer with temperature tuning, and QK norm. Chunks (64 tokens) are
shorter than the training windows (256), so chunk boundaries are trained across.

Text: the docstrings of the standard library's modules, classes and functions (about 1.8 MB on
CPython 3.11), split by module into training text and a held-out evaluation text that
benchmarks use with `llama4-local eval`.

The model is transformers' `Llama4ForCausalLM` (training-only use of the oracle), with the MoE
forward replaced by a sparse one that computes each token's chosen expert only: the same
function as transformers' dense one (which multiplies unchosen experts by zero), 16x less work.
A small load-balancing loss (Switch Transformer style) keeps experts from collapsing.

Output (default benchmarks/small-llama4, committed): the checkpoint in the Hugging Face layout
in bfloat16, tokenizer.json with Llama 4's specials and chat template, `eval.txt` (held-out
text) and `train_log.json`. The committed one: 3.81 M parameters, 2000 steps of 16 x 256
tokens (8.2 M tokens, ~14 passes over 0.60 M), final training loss 1.86; perplexity 35 on
eval.txt (it overfits the small corpus, which does not matter for what it is used for).

    python benchmarks/train_small.py                 # about 40 minutes on 2 idle cores
    python benchmarks/train_small.py --steps 50      # a quick smoke run
    python benchmarks/train_small.py --maverick --out benchmarks/.cache/small-maverick
                                                     # Maverick's layer kinds, for routing locality
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.factory import SPECIALS, write_tokenizer  # noqa: E402
from tests.oracle_images import import_torchvision  # noqa: E402

import_torchvision()  # transformers imports torchvision; see tests/oracle_images.py

DEFAULT_OUT = ROOT / "benchmarks" / "small-llama4"  # committed: 7.6 MB in bfloat16


def docstrings() -> tuple[str, str]:
    """(train, eval) text: stdlib docstrings, one module in 20 held out for evaluation."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if "site-packages" in rel or "/test" in rel or rel.startswith(("test", "idlelib")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    docs.append(doc.strip())
        (held if zlib.crc32(rel.encode()) % 20 == 0 else train).extend(docs)
    return "\n\n".join(train), "\n\n".join(held)


def model_config(
    ids: dict[str, int],
    vocab_size: int,
    hidden: int = 128,
    intermediate: int = 128,
    experts: int = 16,
    layers: int = 4,
    moe_step: int = 1,
) -> dict:
    """Scout's layer kinds by default; `--maverick` gives Maverick's (128 experts on every second
    layer, dense SwiGLU MLPs between, no QK norm)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,  # 128: every INT4 group size divides it; 256: llama.cpp's K-quants too
        intermediate_size=intermediate,
        intermediate_size_mlp=2 * intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=experts,
        num_experts_per_tok=1,
        interleave_moe_layer_step=moe_step,
        no_rope_layer_interval=4,  # layer 3 is NoPE (global attention, temperature tuning)
        attention_chunk_size=64,
        attn_temperature_tuning=True,
        floor_scale=64,
        attn_scale=0.1,
        use_qk_norm=moe_step == 1,
        max_position_embeddings=4096,
        initializer_range=0.02,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        ),
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]],
        pad_token_id=ids["<|finetune_right_pad|>"],
        tie_word_embeddings=False,
    )


def sparse_moe_forward(self, hidden_states):
    """transformers' Llama4TextMoe.forward, computing only each token's chosen experts."""
    h = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(h, self.router.weight)  # [T, E]
    top, idx = torch.topk(logits, self.top_k, dim=1)
    scores = torch.sigmoid(top.float()).to(h.dtype)
    out = self.shared_expert(h)
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()
    tokens = order // self.top_k
    weights = scores.flatten()[order][:, None]
    ex = self.experts
    start = 0
    for e, n in enumerate(counts):
        if n:
            sel = tokens[start : start + n]
            x = h[sel] * weights[start : start + n]
            gate, up = (x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
            out = out.index_add(0, sel, (up * F.silu(gate)) @ ex.down_proj[e])
            start += n
    self._router_logits = logits
    return out, logits


def balance_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss: E * sum_e (fraction routed to e) * (mean prob of e)."""
    e = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = F.one_hot(torch.topk(logits, top_k, dim=-1).indices, e).sum(1).float()
    return e * (chosen.mean(0) * probs.mean(0)).sum() / top_k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--balance", type=float, default=0.01, help="weight of the load-balancing loss")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128, help="256 makes every row a multiple of llama.cpp's 256")
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument(
        "--maverick",
        action="store_true",
        help="Maverick's layer kinds: 128 experts on every second of 8 layers, dense MLPs between, no QK norm",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tokenizers import Tokenizer
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    from transformers.models.llama4 import modeling_llama4

    modeling_llama4.Llama4TextMoe.forward = sparse_moe_forward

    out = args.out
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    train_text, eval_text = docstrings()
    (tmp / "eval.txt").write_text(eval_text)
    # The specials come on top of the trained vocabulary: vocab_size counts both.
    ids = write_tokenizer(tmp, args.vocab - len(SPECIALS), train_text.split("\n\n"))
    tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    eot = ids["<|end_of_text|>"]
    stream = []
    for doc in train_text.split("\n\n"):
        stream.extend(tok.encode(doc, add_special_tokens=False).ids + [eot])
    data = torch.tensor(stream, dtype=torch.long)
    print(
        f"train text {len(train_text) / 1e6:.2f} MB -> {len(data) / 1e6:.2f} M tokens; "
        f"eval text {len(eval_text) / 1e3:.0f} kB",
        flush=True,
    )

    torch.manual_seed(args.seed)
    shape = dict(experts=128, layers=8, moe_step=2) if args.maverick else {}
    cfg = Llama4TextConfig(**model_config(ids, args.vocab, args.hidden, args.intermediate, **shape))
    model = Llama4ForCausalLM(cfg).train()
    n_params = sum(p.numel() for p in model.parameters())
    moes = [m for m in model.modules() if isinstance(m, modeling_llama4.Llama4TextMoe)]
    print(f"{n_params / 1e6:.2f} M parameters, {len(moes)} MoE layers", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 30)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup))))

    bos = ids["<|begin_of_text|>"]
    gen = torch.Generator().manual_seed(args.seed)
    log, t0 = [], time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.seq, (args.batch,), generator=gen)
        chunk = torch.stack([data[s : s + args.seq] for s in starts.tolist()])
        inp = torch.cat([torch.full((args.batch, 1), bos), chunk[:, :-1]], dim=1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(input_ids=inp).logits
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk.reshape(-1))
        aux = sum(balance_loss(m._router_logits, cfg.num_experts_per_tok) for m in moes) / len(moes)
        loss = lm + args.balance * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.perf_counter() - t0
            tps = (step + 1) * args.batch * args.seq / el
            log.append(dict(step=step, loss=round(lm.item(), 4), balance=round(aux.item(), 4), seconds=round(el, 1)))
            print(
                f"step {step:5d}  loss {lm.item():.3f}  balance {aux.item():.3f}  {tps:.0f} tok/s  {el / 60:.1f} min",
                flush=True,
            )

    model = model.eval().to(torch.bfloat16)
    model.save_pretrained(tmp)
    (tmp / "generation_config.json").unlink(missing_ok=True)
    (tmp / "train_log.json").write_text(
        json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, params=n_params, log=log), indent=1)
    )
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    print(f"saved to {out}")


if __name__ == "__main__":
    main()

"""KL divergence and perplexity of INT4 against the original, on the small trained Llama 4.

For each group size (32, 64, 128), symmetric and asymmetric, experts (routed + shared) only and
experts plus attention, it quantizes the trained checkpoint with `quant.quantize` (the code
behind `llama4-local quantize`), with the plain fit ("int4") and with GPTQ on the bundled
calibration text ("gptq", the default; text disjoint from the scored eval.txt), and scores it
against the original with `llama4_local.evaluate`
(the code behind `llama4-local eval --reference`): mean, median, 99th percentile and maximum
KL(original || INT4) of the next-token distributions over the held-out text, top-1 agreement,
and both perplexities. Float32 activations, so only the weights differ. On a model whose rows are multiples
of 256 it first reports the anchor, llama.cpp's Q4_K_M (benchmarks/kquants.py, a torch port
of ggml's reference quantizers), on the whole model and on our default's tensors only. Two
weight-only baselines sit beside ours: plain round-to-nearest (symmetric, per group absmax) and, when
bitsandbytes is installed, its NF4 at the same group size, both applied to the same tensors.

With --llamacpp it scores llama.cpp's own files instead: the model converted by its
convert_hf_to_gguf.py, quantized by llama-quantize to Q4_0 and Q4_K_M without and with an
importance matrix (llama-imatrix over the same calibration text and token count our GPTQ uses)
and to IQ4_XS with it (LLAMACPP_KINDS), each GGUF
dequantized into our model (benchmarks/gguf_weights.py); the tools are built as
bench_vs_llamacpp.py builds them (cached under benchmarks/.cache/).

With --bf16 it measures instead what a bf16 run costs on top of the weights: the original in
bf16, and the default INT4 (GPTQ, attention INT4 too) and the previous default (plain fit,
attention rounded to INT8 at load) in bf16 with float activations in the INT4 kernel, with
int8 ones (what bf16 runs use on AVX2 CPUs) and through bf16 GEMMs of the dequantized weights
(what bf16 prefills use on AMX CPUs), all against the float32 original.

With --lm-head it scores the default's lm_head in each form a run may read: kept (bf16), the
6-bit copy the sidecar holds (GPTQ against the head's inputs), Q8_0, and --int8-lm-head's.

With --tokens 2048,4096,8192 it runs the default quantize with each calibration token count
(`--calibration-tokens`) and times it: how much of GPTQ's gain fewer tokens keep, for hosts
where the calibrated quantize is slow (CPUs without bf16 dot products).

With --rows it runs the default quantize with every routed expert through its calibration rows
(quant/gptq_lowrank.py, which Scout's experts take: the trained model's see more rows than
inputs, so the Hessian's path is theirs by default), that walk's products in int8 (the default
on CPUs without bf16 dot products) and in float32, beside the default: what int8 costs there.

    python benchmarks/bench_quant_kl.py [--model benchmarks/.cache/small-llama4] [--ctx 256]
        [--bf16 | --llamacpp | --precision | --lm-head | --tokens N,.. | --rows]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama4_local.config import load_config  # noqa: E402
from llama4_local.evaluate import evaluate  # noqa: E402
from llama4_local.loader import load_model  # noqa: E402
from llama4_local.tokenizer import Tokenizer  # noqa: E402
from quant.int4 import dequantize_int4, quantize_rtn  # noqa: E402
from quant.kernels import use_cpu_path  # noqa: E402
from quant.quantize import QuantizeOptions, quantize_checkpoint  # noqa: E402

DEFAULT_MODEL = ROOT / "benchmarks" / "small-llama4"


def fake_quantized(model_dir: Path, fn, attention: bool):
    """The original model with experts and shared experts (and attention) replaced by fn(weight)."""
    model, _ = load_model(model_dir, "float32", "cpu")
    for layer in model.layers:
        ff = layer.feed_forward
        mats = []
        if layer.is_moe:
            ex = ff.experts
            for e in range(ex.gate_up_proj.shape[0]):
                # Stored [D, 2I] / [I, D]: quantize along the input dimension, as a linear [out, in].
                gu = ex.gate_up_proj.data[e]
                ex.gate_up_proj.data[e] = fn(gu.T.contiguous()).T
                dn = ex.down_proj.data[e]
                ex.down_proj.data[e] = fn(dn.T.contiguous()).T
            mats += [ff.shared_expert.gate_proj, ff.shared_expert.up_proj, ff.shared_expert.down_proj]
        if attention:
            a = layer.self_attn
            mats += [a.q_proj, a.k_proj, a.v_proj, a.o_proj]
        for lin in mats:
            lin.weight.data = fn(lin.weight.data)
    return model


def q4_k_m(model_dir: Path, only_ours: bool):
    """llama.cpp's Q4_K_M applied to the model (benchmarks/kquants.py): every matrix but routers
    and norms, Q6_K for lm_head and for attn_v / ffn_down in "more bits" layers; with
    `only_ours`, Q4_K on exactly the tensors our default quantizes (routed and shared experts)."""
    from kquants import q4_k, q4_k_m_type, q6_k

    model, cfg = load_model(model_dir, "float32", "cpu")
    n = cfg.num_layers
    fn = {"q4_k": q4_k, "q6_k": q6_k}

    def put(lin, kind):
        if kind != "f32":
            lin.weight.data = fn[kind](lin.weight.data)

    for i, layer in enumerate(model.layers):
        ff = layer.feed_forward
        down_kind = "q4_k" if only_ours else q4_k_m_type("ffn_down", i, n)
        ex = ff.experts
        for e in range(ex.gate_up_proj.shape[0]):
            ex.gate_up_proj.data[e] = q4_k(ex.gate_up_proj.data[e].T.contiguous()).T
            ex.down_proj.data[e] = fn[down_kind](ex.down_proj.data[e].T.contiguous()).T
        put(ff.shared_expert.gate_proj, "q4_k")
        put(ff.shared_expert.up_proj, "q4_k")
        put(ff.shared_expert.down_proj, down_kind)
        if not only_ours:
            a = layer.self_attn
            for lin in (a.q_proj, a.k_proj, a.o_proj):
                put(lin, "q4_k")
            put(a.v_proj, q4_k_m_type("attn_v", i, n))
    if not only_ours:
        model.embed_tokens.weight.data = q4_k(model.embed_tokens.weight.data)
        put(model.lm_head, q4_k_m_type("output", None, n))
    return model


def rtn(group: int):
    def f(w):
        return dequantize_int4(quantize_rtn(w.float(), group), torch.float32)

    return f


def nf4(group: int):
    import bitsandbytes.functional as bnbf

    def f(w):
        q, state = bnbf.quantize_4bit(w.float().contiguous(), blocksize=group, quant_type="nf4")
        return bnbf.dequantize_4bit(q, state).float()

    return f


def q4_k_fits(model_dir: Path) -> bool:
    """Whether llama.cpp would use K-quants here: every row a multiple of 256."""
    cfg = load_config(model_dir)
    return cfg.hidden_size % 256 == 0 and cfg.intermediate_size % 256 == 0


def with_cpu_path(model, path: str):
    if not use_cpu_path(model, path):
        raise SystemExit("the AVX2 INT4 kernel is not in use here (no AVX2/FMA or no compiler)")
    return model


def llamacpp_files(args, report):
    """KL of llama.cpp's real Q4_K_M files of the model, plain and with an importance matrix."""
    import llamacpp
    from gguf_weights import dequantized_model

    from quant.calibrate import DEFAULT_TEXT, DEFAULT_TOKENS, WINDOW

    cache = ROOT / "benchmarks" / ".cache"
    threads = os.cpu_count() or 1
    bin_dir = llamacpp.build(cache)
    work = cache / f"{args.model.name}-gguf"
    work.mkdir(parents=True, exist_ok=True)
    f16, imatrix = work / "f16.gguf", work / "imatrix.gguf"
    if not f16.exists():
        llamacpp.convert(cache, args.model, f16)
    if not imatrix.exists():
        llamacpp.imatrix(bin_dir, f16, DEFAULT_TEXT, imatrix, threads, DEFAULT_TOKENS, WINDOW)
    for kind, im in LLAMACPP_KINDS:
        name = f"{kind.lower()} (llama-quantize{', imatrix' if im else ''})"
        out = work / f"{kind.lower()}{'-imatrix' if im else ''}.gguf"
        if not out.exists():
            llamacpp.quantize(bin_dir, f16, out, kind, threads, imatrix if im else None)
        model, types = dequantized_model(out, args.model, llamacpp.source_dir(cache))
        report(name, model, gguf_types=types)
    with tempfile.TemporaryDirectory() as tmp:  # ours beside them, in the same run
        quantize_checkpoint(args.model, Path(tmp) / "q", QuantizeOptions())
        report("ours default (GPTQ int4 g128, attention + experts)", load_model(Path(tmp) / "q", "float32", "cpu")[0])


# llama.cpp's 4-bit files a user picks among: Q4_0 (what its fast CPU paths favour), Q4_K_M (its
# usual default), both calibrated by an importance matrix, and IQ4_XS (4.25 bits, its strongest
# 4-bit type, which wants the importance matrix)
LLAMACPP_KINDS = (("Q4_0", False), ("Q4_K_M", False), ("Q4_0", True), ("Q4_K_M", True), ("IQ4_XS", True))


def bf16_costs(args, report):
    """KL against the float32 original of bf16 runs: original, INT4 with float / int8 activations
    (and, on a model whose rows are multiples of 256, llama.cpp's Q4_K_M beside them): the default
    (GPTQ, attention INT4 too) and the previous default (plain fit of the experts, attention
    rounded to INT8 at load)."""
    if args.model and q4_k_fits(args.model):
        report("q4_k_m (llama.cpp, whole model)", q4_k_m(args.model, only_ours=False), dtype="float32")
    report("original", load_model(args.model, "bfloat16", "cpu")[0], dtype="bfloat16")
    runs = (
        ("gptq int4 g128 (default: + attention)", QuantizeOptions(), False),
        ("int4 g128 plain fit, experts + shared, INT8 attention", QuantizeOptions(calibrate=False, parts=PLAIN), True),
    )
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, opts, int8_attention) in enumerate(runs):
            out = Path(tmp) / f"q{i}"
            quantize_checkpoint(args.model, out, opts)
            report(name, load_model(out, "float32", "cpu")[0], dtype="float32")
            for path, act in (("avx2", "float"), ("avx2_q8", "int8"), ("avx2_q8", "bf16 GEMM")):
                model = with_cpu_path(load_model(out, "bfloat16", "cpu", int8_attention=int8_attention)[0], path)
                with bf16_gemm(act == "bf16 GEMM"):
                    report(name, model, dtype="bfloat16", activations=act)
            shutil.rmtree(out)


@contextlib.contextmanager
def bf16_gemm(on: bool):
    """Every INT4 product of 2 rows or more through the bf16 GEMM path (AMX CPUs' default from
    32 rows, quant/gemm_kernel.py) while on; never while off, so the other rows measure what
    they name on AMX CPUs too."""
    from quant import cpu_kernel

    old = os.environ.get("LLAMA4_LOCAL_INT4_BF16_GEMM")
    os.environ["LLAMA4_LOCAL_INT4_BF16_GEMM"] = "2" if on else "0"
    cpu_kernel.bf16_gemm_rows.cache_clear()
    try:
        yield
    finally:
        os.environ.pop("LLAMA4_LOCAL_INT4_BF16_GEMM")
        if old is not None:
            os.environ["LLAMA4_LOCAL_INT4_BF16_GEMM"] = old
        cpu_kernel.bf16_gemm_rows.cache_clear()


PLAIN = ("experts", "shared")


def calibration_tokens(args, report):
    """The default quantize at each of args.tokens calibration tokens, timed, with llama.cpp's
    Q4_K_M beside it where the model's rows allow it."""
    if q4_k_fits(args.model):
        report("q4_k_m (llama.cpp, whole model)", q4_k_m(args.model, only_ours=False))
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in [int(t) for t in args.tokens.split(",")]:
            out = Path(tmp) / f"t{tokens}"
            t0 = time.perf_counter()
            quantize_checkpoint(args.model, out, QuantizeOptions(calibration_tokens=tokens))
            seconds = round(time.perf_counter() - t0, 1)
            report("gptq int4 g128 default", load_model(out, "float32", "cpu")[0], tokens=tokens, seconds=seconds)
            shutil.rmtree(out)


def quantizer_precision(args, report):
    """The default quantize (GPTQ) with its arithmetic in bf16 where the CPU multiplies bf16
    natively (GPTQ's updates, the Hessians' products: float32 sums throughout), its updates in
    int8 elsewhere, and its calibration forward's products in int8 (quant/int8_forward.py; 7-bit
    activations where our maddubs kernel pairs steps) against the same run in float32
    (LLAMA4_LOCAL_NO_BF16_GEMM=1, LLAMA4_LOCAL_NO_INT8_CALIBRATION=1,
    LLAMA4_LOCAL_NO_INT8_UPDATES=1), with only the int8 forward off, and with neither the int8
    updates nor the paired steps (LLAMA4_LOCAL_NO_INT8_PAIRS=1), and with the Hessians' Gram
    products in float32 rather than int8 (LLAMA4_LOCAL_NO_INT8_GRAM=1), scored in float32: what the
    faster arithmetic costs; with llama.cpp's Q4_K_M beside them where the model's rows allow it."""
    from quant import cpu_kernel, int8_forward

    if q4_k_fits(args.model):
        report("q4_k_m (llama.cpp, whole model)", q4_k_m(args.model, only_ours=False))
    runs = (
        (
            "gptq int4 g128 default, float32 arithmetic",
            {
                "LLAMA4_LOCAL_NO_BF16_GEMM": "1",
                "LLAMA4_LOCAL_NO_INT8_CALIBRATION": "1",
                "LLAMA4_LOCAL_NO_INT8_UPDATES": "1",
            },
        ),
        ("gptq int4 g128 default, forward in the model's dtype", {"LLAMA4_LOCAL_NO_INT8_CALIBRATION": "1"}),
        (
            "gptq int4 g128 default, no int8 updates or paired steps",
            {"LLAMA4_LOCAL_NO_INT8_UPDATES": "1", "LLAMA4_LOCAL_NO_INT8_PAIRS": "1"},
        ),
        ("gptq int4 g128 default, float32 Gram products", {"LLAMA4_LOCAL_NO_INT8_GRAM": "1"}),
        ("gptq int4 g128 default", {}),
    )
    keys = {key for _, env in runs for key in env}
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in runs:
            for key in keys:
                os.environ.pop(key, None)
            os.environ.update(env)
            cpu_kernel.native_bf16.cache_clear()
            int8_forward.activation_qmax.cache_clear()
            out = Path(tmp) / name.replace(" ", "-").replace("'", "").replace(",", "")
            t0 = time.perf_counter()
            quantize_checkpoint(args.model, out, QuantizeOptions())
            seconds = round(time.perf_counter() - t0, 1)
            report(name, load_model(out, "float32", "cpu")[0], native_bf16=cpu_kernel.native_bf16(), seconds=seconds)


def rows_cost(args, report):
    """The default quantize with every routed expert's feedback from its rows (LowRankFeedback.pays
    forced), that walk's products in int8 (the default here) and in float32 (int8_available
    off: the other linears' walks unchanged), and the default beside them, scored in float32."""
    from quant.gptq_lowrank import LowRankFeedback

    pays, int8 = LowRankFeedback.pays, LowRankFeedback.int8_available
    runs = (
        ("gptq int4 g128 default", False, int8),
        ("gptq int4 g128, routed experts through their rows, int8 products", True, int8),
        ("gptq int4 g128, routed experts through their rows, float32 products", True, lambda device: False),
    )
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, rows, available) in enumerate(runs):
            LowRankFeedback.pays = staticmethod(lambda *a, **k: True) if rows else pays
            LowRankFeedback.int8_available = staticmethod(available)
            try:
                out = Path(tmp) / str(i)
                t0 = time.perf_counter()
                quantize_checkpoint(args.model, out, QuantizeOptions())
                seconds = round(time.perf_counter() - t0, 1)
            finally:
                LowRankFeedback.pays, LowRankFeedback.int8_available = staticmethod(pays), staticmethod(int8)
            report(name, load_model(out, "float32", "cpu")[0], seconds=seconds)


def lm_head_cost(args, report):
    """What the lm_head's forms cost on top of the default quantize: kept (float32 runs), its Q6
    blocks from the sidecar (GPTQ against the head's inputs: what a bf16 CPU run maps), Q8_0
    blocks (what runs rounded a kept head to before; --no-calibrate's sidecar) and
    --int8-lm-head (Q8_0 in place). Each scored in float32 with the head dequantized into the
    model (only the weights differ) and the sidecar forms as the bf16 CPU run computes them."""
    from safetensors import safe_open

    from llama4_local.checkpoint import HEAD_SIDECAR
    from quant import q6
    from quant.head import write_head_sidecar
    from quant.kernels import q8_blocks, q8_dequantize

    def with_head(path, w):
        model = load_model(path, "float32", "cpu")[0]
        model.lm_head.weight.data.copy_(w)
        return model

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "default"
        quantize_checkpoint(args.model, out, QuantizeOptions())
        kept = load_model(out, "float32", "cpu")[0]
        report("gptq int4 g128 default, lm_head kept", kept, dtype="float32")
        w = kept.lm_head.weight.detach().clone()
        with safe_open(str(out / HEAD_SIDECAR), "pt") as f:
            packed = f.get_tensor("q6")
        report("... lm_head Q6 (GPTQ, the sidecar)", with_head(out, q6.dequantize(packed, w.shape[1])), dtype="float32")
        report("... lm_head Q6 (GPTQ, the sidecar)", load_model(out, "bfloat16", "cpu")[0], dtype="bfloat16")
        report(
            "... lm_head Q6 (each block rounded alone)",
            with_head(out, q6.dequantize(q6.pack(*q6.rtn(w)), w.shape[1])),
            dtype="float32",
        )
        report("... lm_head Q8_0", with_head(out, q8_dequantize(*q8_blocks(w), torch.float32)), dtype="float32")
        write_head_sidecar(out / HEAD_SIDECAR, _source_head(out))  # no feedback: Q8_0
        report("... lm_head Q8_0 (the sidecar)", load_model(out, "bfloat16", "cpu")[0], dtype="bfloat16")
        shutil.rmtree(out)
        out = Path(tmp) / "int8"
        quantize_checkpoint(args.model, out, QuantizeOptions(int8_lm_head=True))
        report("gptq int4 g128 default, --int8-lm-head", load_model(out, "float32", "cpu")[0], dtype="float32")
        report("gptq int4 g128 default, --int8-lm-head", load_model(out, "bfloat16", "cpu")[0], dtype="bfloat16")


def _source_head(model_dir: Path) -> torch.Tensor:
    from llama4_local.checkpoint import open_checkpoint

    return open_checkpoint(model_dir).get("lm_head.weight")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--groups", default="32,64,128")
    ap.add_argument("--parts", default="experts,attention", help="experts (+shared), attention (+experts), or both")
    ap.add_argument("--bf16", action="store_true", help="the cost of bf16 runs and of int8 activations instead")
    ap.add_argument("--precision", action="store_true", help="the quantizer's bf16 arithmetic against float32")
    ap.add_argument("--llamacpp", action="store_true", help="llama.cpp's own 4-bit files (LLAMACPP_KINDS) beside ours")
    ap.add_argument("--lm-head", action="store_true", help="the lm_head kept, in Q6 (the sidecar), Q8_0, in place")
    ap.add_argument("--tokens", help="the default quantize at these calibration token counts (e.g. 2048,4096,8192)")
    ap.add_argument("--rows", action="store_true", help="routed experts through their rows, int8 against float32")
    args = ap.parse_args()
    tok = Tokenizer(args.model)
    ids = tok.encode((args.model / "eval.txt").read_text(), add_special_tokens=False)
    ref, _ = load_model(args.model, "float32", "cpu")
    base = evaluate(ref, ids, args.ctx, tok.bos_id, max_windows=args.max_windows)
    print(json.dumps({"model": str(args.model), "tokens": base.tokens, "perplexity": round(base.perplexity, 4)}))

    def report(name, model, **kw):
        r = evaluate(model, ids, args.ctx, tok.bos_id, ref, args.max_windows)
        row = {
            "weights": name,
            **kw,
            "kl_mean": r.kl_mean,
            "kl_median": r.kl_median,
            "kl_p99": r.kl_p99,
            "kl_max": r.kl_max,
            "top1": r.top1_agreement,
            "ppl": r.perplexity,
            "ref_ppl": r.reference_perplexity,
        }
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    if args.bf16:
        return bf16_costs(args, report)
    if args.lm_head:
        return lm_head_cost(args, report)
    if args.precision:
        return quantizer_precision(args, report)
    if args.llamacpp:
        return llamacpp_files(args, report)
    if args.tokens:
        return calibration_tokens(args, report)
    if args.rows:
        return rows_cost(args, report)
    if q4_k_fits(args.model):
        # The anchor: llama.cpp's Q4_K_M (whole model), and its Q4_K on our default's tensors.
        report("q4_k_m (llama.cpp, whole model)", q4_k_m(args.model, only_ours=False))
        report("q4_k (experts + shared only)", q4_k_m(args.model, only_ours=True))
    else:
        print(json.dumps({"note": "rows are not multiples of 256: llama.cpp would not use K-quants here"}))
    with tempfile.TemporaryDirectory() as tmp:
        kinds = args.parts.split(",")
        for attention in [a for a, k in ((False, "experts"), (True, "attention")) if k in kinds]:
            parts = ("experts", "shared") + (("attention",) if attention else ())
            for group in [int(g) for g in args.groups.split(",")]:
                for symmetric, calibrate in itertools.product((True, False), (False, True)):
                    out = Path(tmp) / f"q{group}{symmetric}{attention}{calibrate}"
                    opts = QuantizeOptions(group, symmetric, parts, calibrate=calibrate)
                    quantize_checkpoint(args.model, out, opts)
                    model, _ = load_model(out, "float32", "cpu")
                    name = "gptq" if calibrate else "int4"
                    report(name, model, group=group, symmetric=symmetric, attention=attention)
                    shutil.rmtree(out)
                report(
                    "rtn",
                    fake_quantized(args.model, rtn(group), attention),
                    group=group,
                    symmetric=True,
                    attention=attention,
                )
                try:
                    fn = nf4(group)
                except ImportError:
                    continue
                report("nf4", fake_quantized(args.model, fn, attention), group=group, attention=attention)


if __name__ == "__main__":
    main()

"""The calibration forward's matrix products in int8 (quant/calibrate.py's LayerRunner).

GPTQ needs what each linear sees on the calibration text, not the model's outputs to the last
bit: the forward that produces those inputs is a third of a calibrated quantize's time (at the
issue's Scout-width slice, 63 of 206 s on two Zen 4 threads), all of it bf16 GEMMs (float32
where the CPU lacks bf16). Here each product rounds its activations to int8 per row (token) and
the weight to int8 per output (rows and outputs that one large value dominates stay in the
model's dtype: CREST), multiplies in int32 and scales back: an error of about 1% of a product,
against bf16's 0.2%. What it costs GPTQ was measured on the trained 256-wide model
(docs/benchmarks.md): within the spread that any perturbation of the forward gives its KL
(GPTQ's choices are chaotic in its inputs).

Who multiplies (int8_gemm_by_torch): on a CPU with AVX512-VNNI, torch._int_mm (oneDNN's int8
GEMM: on two Zen 4 threads 760-820 GOP/s against 390-430 for bf16). Anywhere else PyTorch's CPU
_int_mm is a scalar loop (1.4 GMAC/s on two Zen 3 threads, 30-70x below its float32 GEMM), so
there our own kernel does (quant/int8_gemm_kernel.py: `vpmaddubsw` + `vpmaddwd`, or `vpdpbusd`
with AVX-VNNI; 118 GMAC/s on two Zen 3 threads against 53-70 for torch's float32). `vpmaddubsw`
takes the activations as unsigned bytes (x + 128) and its 16-bit sums of two products saturate
where two large weights meet two large activations: there the weights are rounded to 7 bits
(|q| <= 63, where no pair sum can pass 32767), so every product is still exactly the rounded
operands' product, at a coarser weight (weight_qmax). oneDNN held to AVX2 on a VNNI CPU
(ONEDNN_MAX_CPU_ISA) does the same inside torch._int_mm: what it does is probed once there. Our
maddubs kernel also takes the activations at 7 bits (activation_qmax), which lets it add two
steps' pair sums in int16 before widening them: a quarter fewer multiplies.

Only where the extension is built (x86 with AVX2), the activations are bf16 or float32 and
there are at least MIN_ROWS rows; `LLAMA4_LOCAL_NO_INT8_CALIBRATION=1` keeps the forward in the
model's own dtype.
"""

from __future__ import annotations

import functools
import os

import torch

from . import cpu_kernel

MIN_ROWS = 32  # fewer rows (a decode-sized product): the model's own path
# A routed expert's weight is rounded each time it runs (35-60 ms for a 5120 x 16384 gate/up on
# two Zen 4 threads, at memory speed), which int8 repays from about 250 rows against bf16.
EXPERT_MIN_ROWS = 256
CHUNK_ROWS = 2048  # int32 products [CHUNK_ROWS, O] at a time (8192 x 16384 at once: 0.5 GB)


def enabled() -> bool:
    return not os.environ.get("LLAMA4_LOCAL_NO_INT8_CALIBRATION") and cpu_kernel.available()


def gram_int8() -> bool:
    """Whether the calibration's Hessians take the int8 Gram products (quant.gptq.add_gram's
    `int8`, where the CPU would take the float32 kernel): with the int8 forward, unless
    LLAMA4_LOCAL_NO_INT8_GRAM=1 (to measure what it costs)."""
    return enabled() and not os.environ.get("LLAMA4_LOCAL_NO_INT8_GRAM")


@functools.cache
def int8_gemm_by_torch() -> bool:
    """Whether torch._int_mm multiplies (oneDNN: PyTorch takes it on CPUs with AVX512-VNNI, AMX
    ones among them) rather than quant/int8_gemm_kernel.py (every other CPU, where PyTorch's is a
    scalar loop). LLAMA4_LOCAL_NO_VNNI=1 (the AVX2 hold) picks ours, as on an AVX2 CPU."""
    return cpu_kernel.isa() == "avx512-vnni"


@functools.cache
def weight_qmax() -> int:
    """The weights' levels: the most at which every product is exact. Ours: 127 with VNNI, 63
    with maddubs. torch._int_mm's: 127 where its products are exact on full-range int8 (VNNI,
    AMX), 63 where its pair sums saturate (oneDNN held to AVX2: 255 * 63 * 2 < 32767 keeps them
    exact)."""
    if not int8_gemm_by_torch():
        return cpu_kernel.int8_gemm_exact_qmax()
    a = torch.full((256, 256), 127, dtype=torch.int8)  # a GEMM's shape, not a GEMV's (microseconds)
    b = torch.full((256, 64), 127, dtype=torch.int8)
    exact = 256 * 127 * 127
    return 127 if bool((torch._int_mm(a, b) == exact).all()) else 63


@functools.cache
def activation_qmax() -> int:
    """The activations' levels: 63 where our maddubs kernel multiplies (7 bits let it add two
    steps' pair sums in int16: int8_gemm_pairs, a quarter fewer multiplies, 1.2-1.3x), else 127.
    LLAMA4_LOCAL_NO_INT8_PAIRS=1 keeps 127 there (to measure what the pairing costs)."""
    if int8_gemm_by_torch() or os.environ.get("LLAMA4_LOCAL_NO_INT8_PAIRS") or not cpu_kernel.int8_gemm_pairs():
        return 127
    return 63


def activations_narrow() -> bool:
    """Whether activations rounded to activation_qmax() are int8_gemm's `narrow` (|x| <= 63)."""
    return activation_qmax() < 64


# Rows (tokens) and outputs whose largest magnitude stands more than CREST times their rms above
# it keep the model's dtype: per-row int8's error relative to a row's rms is about crest / 440 (a
# rounding step of max / 127, uniform): 1% for a Gaussian row of 5120 (crest ~4.5), 5.5% at 24.
# A massive activation (an attention sink's hidden state, 100x and more in one channel) or one
# outsized weight in an output's row goes over; SwiGLU's heavy-tailed products (crests 10-24 on
# the slice's expert inputs) do not, and 3% of error in every product of the forward left GPTQ's
# KL on the trained model inside its spread (docs/benchmarks.md). Activations at 7 bits
# (activation_qmax) double a row's error (crest / 220) under the same limit: KL still inside the
# spread (session 37); weights at 7 bits take a limit scaled down to keep theirs (Int8Weight).
CREST = 24.0


class Int8Weight:
    """A weight rounded to int8 with one scale per output: where torch._int_mm multiplies, q [K, O]
    (a transposed view for a [O, K] linear weight), elsewhere the same integers as our kernel's
    panels only (`packed`, `sums`: int8_pack's; q None: no second int8 copy of each cached
    weight, ~190 MB a layer at Scout's widths); s float32 [O]; `src` the weight itself in q's
    orientation (a view), for the outputs whose crest is over CREST (`exact`, their indices)."""

    def __init__(self, q: torch.Tensor, s: torch.Tensor, crest: torch.Tensor, src: torch.Tensor):
        self.s, self.src, self.outputs = s, src, q.shape[1]
        if int8_gemm_by_torch():
            self.q, self.packed, self.sums = q, None, None
        else:
            self.q, (self.packed, self.sums) = None, cpu_kernel.int8_pack(q)
        self.exact = (crest > CREST * weight_qmax() / 127).nonzero().flatten()  # the same error bound at 7 bits

    def ints(self) -> torch.Tensor:
        """The integers [K, O], from the panels where q is not kept (tests)."""
        if self.q is not None:
            return self.q
        p, k4, _ = self.packed.shape
        q = self.packed.view(p, k4, 16, 4).permute(1, 3, 0, 2).reshape(4 * k4, 16 * p)
        return q[: self.src.shape[0], : self.outputs]

    @classmethod
    def of_linear(cls, w: torch.Tensor) -> Int8Weight:
        """From a linear's weight [O, K]."""
        q, s, crest = cpu_kernel.int8_rows(w, weight_qmax())
        return cls(q.t(), s, crest, w.t())

    @classmethod
    def of_in_out(cls, w: torch.Tensor) -> Int8Weight:
        """From a weight stored inputs by outputs [K, O] (the fused experts' layout)."""
        q, s, crest = cpu_kernel.int8_cols(w, weight_qmax())
        return cls(q, s, crest, w)


_FLOAT = (torch.bfloat16, torch.float32, torch.float16)


def usable(x: torch.Tensor, min_rows: int = MIN_ROWS) -> bool:
    return x.dim() == 2 and x.shape[0] >= min_rows and x.dtype in _FLOAT[:2] and x.device.type == "cpu"


def plain_weight(w) -> bool:
    """A weight int8_rows / int8_cols can round: a float tensor on the CPU (not an FP8 source's)."""
    return isinstance(w, torch.Tensor) and w.dtype in _FLOAT and w.device.type == "cpu"


def product(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x [T, K] @ W [K, O] in int8: x rounded per row, W as stored in w; the result in x's dtype.
    Rows of x and outputs of W whose crest is over CREST are computed in x's dtype instead."""
    out = torch.empty(x.shape[0], w.outputs, dtype=x.dtype)
    crests = []
    for t0 in range(0, x.shape[0], CHUNK_ROWS):
        t1 = min(t0 + CHUNK_ROWS, x.shape[0])
        xq, sx, cx = cpu_kernel.int8_rows(x[t0:t1], activation_qmax())
        if w.packed is None:
            cpu_kernel.int8_rescale(torch._int_mm(xq, w.q), sx, w.s, out[t0:t1])
        else:
            cpu_kernel.int8_gemm(xq, w.packed, w.sums, sx, w.s, out[t0:t1], narrow=activations_narrow())
        crests.append(cx)
    rows = (torch.cat(crests) > CREST).nonzero().flatten()
    if rows.numel():
        out[rows] = x[rows] @ w.src.to(x.dtype)
    if w.exact.numel():
        out[:, w.exact] = x @ w.src[:, w.exact].to(x.dtype)
    return out


def int8_linear(lin) -> bool:
    """Give a model Linear an int8 forward for many rows (the weight rounded on first use, kept
    with the module until its instance forward is removed); fewer rows go the usual way. Not
    for a weight that is not plain_weight. Returns whether it did."""
    if not plain_weight(getattr(lin, "weight", None)):
        return False
    plain, cached = lin.forward, []

    def forward(x):
        if not usable(x):
            return plain(x)
        if not cached:
            cached.append(Int8Weight.of_linear(lin.weight))
        return product(x, cached[0])

    lin.forward = forward
    return True


def int8_experts(experts, act_of=None):
    """An act(e, x) for model.Experts computing silu(gate) * up with the gate/up product in int8
    (expert e's weight rounded on each call, from EXPERT_MIN_ROWS rows: the calibration forward
    runs each expert once per layer), and an expert(e, x) whose down product is int8 too;
    returns (act, expert). `act_of`: the act that expert() calls (a recording wrapper around the
    returned act), default act.
    None where the experts' weights are not plain_weight."""
    from llama4_local.model import matmul, silu_mul

    if not (plain_weight(getattr(experts, "gate_up_proj", None)) and plain_weight(getattr(experts, "down_proj", None))):
        return None

    def act(e, x):
        w = experts.gate_up_proj[e]
        y = product(x, Int8Weight.of_in_out(w)) if usable(x, EXPERT_MIN_ROWS) else matmul(x, w)
        gate, up = y.chunk(2, dim=-1)
        return silu_mul(gate, up)

    def expert(e, x):
        a = (act_of or act)(e, x)
        w = experts.down_proj[e]
        return product(a, Int8Weight.of_in_out(w)) if usable(a, EXPERT_MIN_ROWS) else matmul(a, w)

    return act, expert

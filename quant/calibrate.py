"""Calibration for GPTQ (quant/gptq.py): the source model run one decoder layer at a time.

The original checkpoint is loaded as it is (memory-mapped, nothing converted: Scout's bf16 or
Maverick's FP8), the calibration text's windows are embedded, and each call to `run_layer(i)`
pushes every window's hidden states through layer i with the original weights, recording what
its quantizable linears see: the input second moments of q/k/v (one input), o, the shared
expert's gate/up and down, a dense MLP's, and, per routed expert, the rows routed to it (the
router's score already applied, as Llama 4 does) with what its down projection sees from
them. Only one layer's statistics live at a time, so memory is the hidden states (tokens x
hidden) plus one layer's Hessians and expert rows; the statistics come from the original
model's activations at every layer.

The default text (quant/data/calibration.txt) is documentation prose from CPython's standard
library docstrings (Python Software Foundation License), taken from the modules that
benchmarks/train_small.py trains on, so none of it is in the held-out text the KL benchmarks
score. `--calibration FILE` takes any UTF-8 text instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llama4_local.errors import UserError
from llama4_local.evaluate import windows
from llama4_local.model import native_low_precision, rope_freqs

from . import int8_forward
from .gptq import HessianSum, error_feedback, hessian_finite

DEFAULT_TEXT = Path(__file__).parent / "data" / "calibration.txt"
DEFAULT_TOKENS = 8192
WINDOW = 512


def calibration_windows(tokenizer, text_path: Path | None, tokens: int, window: int = WINDOW) -> list[list[int]]:
    """The first `tokens` tokens of the text, in windows of `window` (each starting with BOS)."""
    path = Path(text_path) if text_path else DEFAULT_TEXT
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read calibration text {path}: {e}; pass a UTF-8 text file") from None
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    if len(ids) < 2:
        raise UserError(f"calibration text {path} is too short: it needs at least a few hundred tokens")
    return list(windows(ids, window, tokenizer.bos_id))  # as `eval` cuts its text


@dataclass
class LayerStats:
    """What one layer's linears saw: Hessian sums by role, and each routed expert's input rows."""

    hessians: dict[str, HessianSum] = field(default_factory=dict)
    expert_inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    expert_acts: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # what each expert's down saw
    tokens: int = 0
    factors: dict[str, torch.Tensor | None] = field(default_factory=dict)

    def hessian(self, role: str) -> torch.Tensor | None:
        h = self.hessians.get(role)
        return None if h is None else h.mean()

    def factor(self, role: str) -> torch.Tensor | None:
        """GPTQ's error feedback for a role's Hessian (computed once: q, k and v share one). The
        role's sum goes into it (error_feedback needs neither its mean nor its upper half), so
        hessian(role) is None afterwards."""
        if role not in self.factors:
            h = self.hessians.get(role)
            self.factors[role] = factor_or_none(None if h is None else h.take_lower(), consume=True)
        return self.factors[role]

    def expert_rows(self, e: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Expert e's input rows and its down projection's (in the forward's dtype), or None if no
        row chose it."""
        if not self.expert_inputs.get(e):
            return None
        return torch.cat(self.expert_inputs[e]), torch.cat(self.expert_acts[e])


def factor_or_none(h: torch.Tensor | None, consume: bool = False) -> torch.Tensor | None:
    """GPTQ's error feedback for H, or None (the plain fit) where there is no H or the model's own
    activations on the calibration text were not finite (a broken checkpoint: its linears still
    quantize, without calibration)."""
    if h is None or not hessian_finite(h):
        return None
    return error_feedback(h, consume=consume)


class LayerRunner:
    """Hidden states of the calibration windows, pushed through the model one layer at a time."""

    def __init__(self, model, texts: list[list[int]]):
        self.model = model
        emb = model.embed_tokens.weight
        self.hidden = [F.embedding(torch.tensor(w, device=emb.device), emb) for w in texts]
        self.freqs = [rope_freqs(model.inv_freq, torch.arange(len(w), device=emb.device)) for w in texts]

    @torch.inference_mode()
    def run_layer(self, i: int, output: bool = True) -> LayerStats:
        """Layer i's statistics; the hidden states move on past it unless `output` is False (the
        last layer's feed nothing: its down projections then record their inputs and stop there,
        at Scout's widths a third of that layer's feed-forward arithmetic, and `hidden` is None
        afterwards)."""
        layer, stats = self.model.layers[i], LayerStats()
        hooks = []
        gram8 = int8_forward.gram_int8()

        def record(module, role: str):
            h = stats.hessians.setdefault(role, HessianSum(int8=gram8))
            hooks.append(module.register_forward_pre_hook(lambda _m, inp: h.add(inp[0])))

        attn = layer.self_attn
        record(attn.q_proj, "qkv")
        record(attn.o_proj, "o")
        ff = layer.feed_forward
        experts = getattr(ff, "experts", None)
        int8 = int8_forward.enabled()
        if experts is not None:
            mlp = ff.shared_expert
            record(mlp.gate_proj, "shared_gu")
            record(mlp.down_proj, "shared_down")
            fns = int8_forward.int8_experts(experts, lambda e, x: experts.act(e, x)) if int8 else None
            original, expert = fns or (experts.act, None)

            def act(e, x):
                a = original(e, x)
                stats.expert_inputs.setdefault(e, []).append(x.detach())
                stats.expert_acts.setdefault(e, []).append(a.detach())
                return a

            experts.act = act
            if expert is not None:
                experts.expert = expert
        else:
            mlp = ff
            record(ff.gate_proj, "mlp_gu")
            record(ff.down_proj, "mlp_down")
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        for lin in linears:
            if not (int8 and int8_forward.int8_linear(lin)) and lin in linears[:4]:
                _widen_once(lin)
        downs = [] if output else [mlp.down_proj]
        for lin in downs:  # a down projection's output is the hidden size
            lin.forward = lambda x, d=self.hidden[0].shape[-1]: x.new_zeros(x.shape[0], d)
        if downs and experts is not None:
            experts.expert = lambda e, x: experts.act(e, x).new_zeros(x.shape)
        try:
            # DecoderLayer.forward, with the feed-forward half run once on every window's tokens
            # together (it is per token; only attention needs the windows apart): a bf16 weight is
            # widened to float32 once per layer instead of once per window.
            mid = []
            for j, x in enumerate(self.hidden):
                cache = self.model.new_cache(x.shape[0])
                mid.append(x + layer.self_attn(layer.input_layernorm(x), 0, self.freqs[j], cache.layers[i]))
                stats.tokens += x.shape[0]
            h = torch.cat(mid)
            out = h + ff(layer.post_attention_layernorm(h))
            self.hidden = list(out.split([x.shape[0] for x in mid])) if output else None
        finally:
            for h in hooks:
                h.remove()
            if experts is not None:
                del experts.act  # the class's method again
                vars(experts).pop("expert", None)
            for lin in linears:
                vars(lin).pop("forward", None)
        return stats

    @torch.inference_mode()
    def head_feedback(self) -> torch.Tensor | None:
        """GPTQ's error feedback for the lm_head's inputs: the final norm of the hidden states that
        came out of the last layer (run with `output`)."""
        h = HessianSum(int8=int8_forward.gram_int8())
        for x in self.hidden:
            h.add(self.model.norm(x))
        return factor_or_none(h.take_lower(), consume=True)


def _widen_once(lin) -> None:
    """A bf16/fp16 linear run once per window computes as model.linear does for many rows (x and
    the weight in float32, the product rounded back), with the weight widened once per layer
    instead of once per call (at Scout's widths 100 MB converted per projection and window).
    Not where the CPU multiplies bf16 natively: model.linear's bf16 GEMM is faster still."""
    w = getattr(lin, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.bfloat16, torch.float16) or w.device.type != "cpu":
        return
    if native_low_precision(w.dtype):
        return
    wide = w.float()
    lin.forward = lambda x: F.linear(x.float(), wide).to(x.dtype)

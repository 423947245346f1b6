"""The calibrated (GPTQ) pass of `quantize`: every target linear of the text layers, layer by layer.

For each decoder layer the source model runs the calibration windows through it (quant/
calibrate.py), then each quantized linear of that layer is fitted by GPTQ to the inputs it saw:
q/k/v share one Hessian, o its own, the shared expert's and a dense MLP's gate/up theirs and
down theirs; a routed expert's gate/up use the rows routed to it, its down the activations
those rows produce through the original gate/up. An expert no calibration token chose (possible
with 128 experts and a short text) gets the plain fit. Outputs go to the same shard writer, in
the same units, as the uncalibrated pass, so an interrupted run resumes the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from llama4_local import pages
from llama4_local.checkpoint import tensor_offsets

from . import int8_forward
from .calibrate import LayerRunner, LayerStats, factor_or_none
from .format import to_tensors
from .gptq import DAMP, default_updates, gram_lower
from .gptq_lowrank import LowRankFeedback, lowrank_feedback
from .quantize import _nbytes, expert_linears

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_UNFUSED = re.compile(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_ROLES = (
    (("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    (("self_attn.o_proj.weight",), "o"),
    (("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight"), "shared_gu"),
    (("shared_expert.down_proj.weight",), "shared_down"),
    (("feed_forward.gate_proj.weight", "feed_forward.up_proj.weight"), "mlp_gu"),
    (("feed_forward.down_proj.weight",), "mlp_down"),
)


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def role_of(name: str) -> str | None:
    for suffixes, role in _ROLES:
        if name.endswith(suffixes):
            return role
    return None


class _Reader:
    """Source tensors by name, each shard opened once; FP8 weights dequantized (quantize's _Fp8Source)."""

    def __init__(self, tensors: dict[str, Path], fp8_source):
        self.tensors, self.fp8 = tensors, fp8_source
        self.files: dict[Path, object] = {}

    def handle(self, name: str):
        path = self.tensors[name]
        if path not in self.files:
            self.files[path] = safe_open(str(path), framework="pt")
        return self.files[path]

    def read(self, name: str) -> torch.Tensor:
        f = self.handle(name)
        return self.fp8.read(f, name) if self.fp8 else f.get_tensor(name)


def calibrated_pass(ctx, names: list[str]) -> set[str]:
    """Quantize the text-layer targets among `names` with GPTQ; returns the names it handled.

    `ctx` is quantize's run state: src, opts, calibration windows, fp8 source, tensors, writer,
    skip (units already in finished shards), quantize(w, f) (f: GPTQ's error feedback, or None
    for the plain fit), progress(name, source bytes done), count (linears quantized) and
    want_head: the hidden states go on through every layer and the final norm, and
    ctx.head_feedback is set to GPTQ's error feedback for the lm_head's inputs (quant/head.py's
    Q6 blocks; None where they are not finite)."""
    from llama4_local.loader import load_model

    by_layer: dict[int, list[str]] = {}
    for name in names:
        i = layer_of(name)
        if i is not None:
            by_layer.setdefault(i, []).append(name)
    if not by_layer:
        return set()
    reader = _Reader(ctx.tensors, ctx.fp8_source)
    emb = _any_embedding(ctx.tensors)  # its dtype from the header: Scout's is 2 GB
    dtype = "float32" if reader.handle(emb).get_slice(emb).get_dtype() == "F32" else "bfloat16"
    model, _ = load_model(ctx.src, dtype, "cpu", mmap=True)
    runner = LayerRunner(model, ctx.windows)
    handled: set[str] = set()
    head = ctx.want_head
    last = len(model.layers) - 1 if head else max(by_layer)  # nothing past it needs hidden states
    read_ahead(ctx.tensors, 0)
    for i in range(last + 1):
        if i < last:
            read_ahead(ctx.tensors, i + 1)  # read while layer i computes
        stats = runner.run_layer(i, output=head or i < last)
        _quantize_layer(ctx, reader, stats, by_layer.get(i, []))
        handled.update(by_layer.get(i, []))
        del stats  # its factors and rows (~0.8 GB at Scout's widths) not alive through the next layer
    if head:
        ctx.head_feedback = runner.head_feedback()
    del runner, model
    return handled


def read_ahead(tensors: dict[str, Path], layer: int) -> None:
    """Start reading text layer `layer`'s source tensors into the page cache and return at once
    (pages.read_ahead). The calibration forward reads its memory-mapped weights through page
    faults, a small read-ahead window at a time; asked ahead, the kernel reads the next layer at
    the disk's speed while this one computes (Scout's 216 GB rarely fit in the page cache)."""
    offsets: dict[Path, dict[str, tuple[int, int]]] = {}
    for name, path in tensors.items():
        if layer_of(name) == layer and "vision" not in name:
            if path not in offsets:
                offsets[path] = tensor_offsets(path)
            start, end = offsets[path][name]
            pages.read_ahead(path, start, end - start)


def _any_embedding(tensors: dict[str, Path]) -> str:
    return next(n for n in tensors if n.endswith("embed_tokens.weight"))


def _quantize_layer(ctx, reader: _Reader, stats: LayerStats, names: list[str]) -> None:
    """Every target of one layer; a routed expert's gate, up and down together (down's Hessian
    comes from the same rows through gate and up)."""
    experts: dict[tuple[str, int], dict[str, str]] = {}  # (prefix, e) -> proj -> source name
    for name in sorted(names):
        m = _UNFUSED.match(name)
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            prefix, _, kind = name.rpartition(".")
            n = reader.handle(name).get_slice(name).get_shape()[0]
            for e in range(n):
                experts.setdefault((prefix, e), {})[kind] = name
        elif m:
            experts.setdefault((m.group(1), int(m.group(2))), {})[m.group(3)] = name
        else:
            ctx.count += 1
            if name not in ctx.skip:
                f = stats.factor(role_of(name))
                ctx.writer.add(to_tensors(name.removesuffix(".weight"), ctx.quantize(reader.read(name), f)), name)
            ctx.progress(name, _nbytes(reader.handle(name), name))
    for (prefix, e), projs in sorted(experts.items()):
        _expert(ctx, reader, stats, prefix, e, projs)


def _expert_factors(stats: LayerStats, e: int):
    """GPTQ's error feedback (gate/up's input, down's input) for expert e, or (None, None) if no
    calibration row chose it."""
    rows = stats.expert_rows(e)
    if rows is None:
        return None, None
    return tuple(_feedback(r) for r in rows)


def _feedback(rows: torch.Tensor):
    """GPTQ's feedback for a linear that saw `rows` [r, N]: from the rows themselves where they
    are few (quant/gptq_lowrank.py: Scout's routed experts), else through the Hessian's factor;
    None where they are not finite."""
    if LowRankFeedback.pays(*rows.shape, default_updates(rows.device)):
        return lowrank_feedback(rows, DAMP)
    return factor_or_none(gram_lower(rows, int8=int8_forward.gram_int8()), consume=True)


def _expert(ctx, reader: _Reader, stats: LayerStats, prefix: str, e: int, projs: dict[str, str]) -> None:
    """Expert e's linears: fused (`gate_up_proj` / `down_proj` names, unit "name#e") or one
    tensor per linear (`gate` / `up` / `down`, unit the name)."""
    fused = "gate_up_proj" in projs or "down_proj" in projs
    if fused:
        units = {kind: f"{name}#{e}" for kind, name in projs.items()}
        ctx.count += 2 * ("gate_up_proj" in projs) + ("down_proj" in projs)
    else:
        units = dict(projs)
        ctx.count += len(projs)
    todo = [k for k, u in units.items() if u not in ctx.skip]
    if todo:
        f_in, f_down = _expert_factors(stats, e)
        for kind in todo:
            name = projs[kind]
            if fused:
                linears = expert_linears(name, reader.handle(name).get_slice(name)[e])
            else:
                linears = {f"{kind}_proj": reader.read(name)}
            tensors = {}
            for proj, w in linears.items():
                f = f_down if proj == "down_proj" else f_in
                tensors.update(to_tensors(f"{prefix}.{e}.{proj}", ctx.quantize(w, f)))  # a view: GPTQ reads its blocks
            ctx.writer.add(tensors, units[kind])
    for name in set(projs.values()):
        n = _nbytes(reader.handle(name), name)
        ctx.progress(name, n // reader.handle(name).get_slice(name).get_shape()[0] if fused else n)

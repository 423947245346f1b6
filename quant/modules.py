"""Swapping a model's linears for INT4 ones when the checkpoint holds them quantized."""

from __future__ import annotations

import torch
from torch import nn

from llama4_local import cpu_decode
from llama4_local.errors import UserError
from llama4_local.model import silu_mul

from .format import QuantScheme, from_tensors
from .kernels import Int4Linear, make_linear


class QuantizedExpert(nn.Module):
    def __init__(self, gate: Int4Linear, up: Int4Linear, down: Int4Linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """What down sees: silu(gate) * up."""
        return silu_mul(self.gate_proj(x), self.up_proj(x))

    def forward(self, x):
        return self.down_proj(self.act(x))


class QuantizedExperts(nn.Module):
    """Routed experts as E separate INT4 SwiGLU MLPs; same `act(e, x)`, `expert(e, x)` and `run`
    as model.Experts."""

    def __init__(self, experts: list[QuantizedExpert]):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self._stacks: dict[str, dict[str, torch.Tensor]] | None = None
        self.stacked_extra = False  # whether stacks() holds a shared expert at index E

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def act(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[e].act(x)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[e].down_proj(self.act(e, x))

    def run(self, groups: list[tuple[int, torch.Tensor]], overlap=None) -> list[torch.Tensor]:
        if overlap is not None:  # (model.Experts.run)
            overlap()
        return [self.expert(e, x) for e, x in groups]

    def stacks(self, extra: nn.Module | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Each projection's buffers stacked over the experts ([E, ...] per buffer name), made
        once: the experts' own buffers become views of the stacks, so there is no second copy.
        What kernels that pick an expert by a device index read (graph_decode, triton_moe).
        `extra` (the layer's shared expert, INT4 of the same shapes and path) is stacked after
        them, index E, where the stacks are first made with it: `stacked_extra` says whether."""
        if self._stacks is None:
            mlps = list(self.experts)
            if extra is not None and _same_int4(extra, mlps[0]):
                mlps.append(extra)
            stacks = {}
            for p in ("gate_proj", "up_proj", "down_proj"):
                mods = [getattr(e, p) for e in mlps]
                if not all(isinstance(m, Int4Linear) for m in mods):
                    raise UserError("stacked experts must be INT4 (not NF4 or FP8)")
                stacks[p] = {n: torch.stack([m._buffers[n] for m in mods]) for n in mods[0]._buffers}
                for e, m in enumerate(mods):
                    for n, t in stacks[p].items():
                        m._buffers[n] = t[e]
            self._stacks, self.stacked_extra = stacks, len(mlps) > len(self.experts)
            cpu_decode.invalidate()  # the experts' buffers are new tensors (views of the stacks)
        return self._stacks

    def fused(self, x: torch.Tensor, idx: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | None:
        """The routed experts' summed output for many tokens in three grouped kernel launches and no
        host sync (quant/triton_moe.py), where every expert takes the Triton INT4 path (CUDA's
        default), activations are bf16/fp16 and the tokens are at most triton_moe.MAX_TOKENS
        (0 by default: the grouped kernels measured slower than dequantize + cuBLAS); else None."""
        first = self.experts[0].gate_proj
        if getattr(first, "path", None) != "triton" or x.dtype not in (torch.bfloat16, torch.float16):
            return None
        from . import triton_moe

        if not triton_moe.available() or x.shape[0] > triton_moe.MAX_TOKENS:
            return None
        st = {p: (b["packed"], b["scales_and_zeros"]) for p, b in self.stacks().items()}
        return triton_moe.moe_experts(x, idx, scores, st, first.group_size)


def _same_int4(a: nn.Module, b: nn.Module) -> bool:
    """Whether two SwiGLU MLPs' projections are INT4 linears of one shape, group and path (so
    their buffers stack)."""
    for p in ("gate_proj", "up_proj", "down_proj"):
        x, y = getattr(a, p, None), getattr(b, p, None)
        if not (isinstance(x, Int4Linear) and isinstance(y, Int4Linear)):
            return False
        if (x.shape, x.group_size, x.path, x.dtype) != (y.shape, y.group_size, y.path, y.dtype):
            return False
        if {n: (t.shape, t.dtype, t.device) for n, t in x._buffers.items()} != {
            n: (t.shape, t.dtype, t.device) for n, t in y._buffers.items()
        }:
            return False
    return True


def apply_quantized(
    model: nn.Module, ckpt, scheme: QuantScheme, dtype: torch.dtype, device, routed: bool = True
) -> int:
    """Replace every linear whose checkpoint tensors are quantized; returns how many.

    With `routed=False` the routed experts are left alone (the offload manager serves them).
    """

    def load(prefix: str) -> Int4Linear:
        try:
            qw = from_tensors(lambda n: ckpt.get(n), prefix, scheme)
        except KeyError as e:
            raise UserError(f"quantized checkpoint {ckpt.root} lacks {e.args[0]}; is it complete?") from None
        return make_linear(qw, device, dtype)

    count = 0
    for i, layer in enumerate(model.layers):
        ff = layer.feed_forward
        base = f"layers.{i}.feed_forward.experts"
        if routed and getattr(layer, "is_moe", False) and scheme.marker(f"{base}.0.gate_proj") in ckpt:
            n = ff.num_experts
            ff.experts = QuantizedExperts(
                [QuantizedExpert(*(load(f"{base}.{e}.{p}_proj") for p in ("gate", "up", "down"))) for e in range(n)]
            )
            count += 3 * n
    for name, module in list(model.named_modules()):
        if hasattr(module, "weight") and scheme.marker(name) in ckpt:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, load(name))
            count += 1
    return count

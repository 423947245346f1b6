"""The compressed-tensors "pack-quantized" checkpoint layout (what vLLM serves).

One quantized linear `P` is stored as `P.weight_packed` (int32 [O, N/8]), `P.weight_scale`
([O, G]), `P.weight_shape` (int [2]) and, when asymmetric, `P.weight_zero_point` (int32
[O/8, G], packed along O). Routed experts are stored one linear per expert:
`...feed_forward.experts.{e}.{gate,up,down}_proj`. `config.json` carries the scheme in
`quantization_config`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama4_local.errors import UserError

from .fp8 import Fp8Format
from .int4 import Int4Weight, pack_int4, unpack_int4

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")

# quantize's INT8 lm_head (Q8_0's blocks: int8 weights, a float32 scale per 32), as a
# compressed-tensors group: its regex target outranks group_0's class target "Linear".
LM_HEAD_TARGET = "re:.*lm_head$"
LM_HEAD_GROUP = {
    "targets": [LM_HEAD_TARGET],
    "weights": {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": 32,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    },
    "input_activations": None,
    "output_activations": None,
    "format": "int-quantized",
}


@dataclass(frozen=True)
class QuantScheme:
    group_size: int = 128  # NF4: the block size
    symmetric: bool = True
    num_bits: int = 4
    kind: str = "int4"  # "int4" (compressed-tensors), "nf4" (bitsandbytes, quant/nf4.py) or "fp8"
    fp8: Fp8Format | None = None  # for kind "fp8": compressed-tensors float-quantized (quant/fp8.py)

    def marker(self, prefix: str) -> str:
        """The tensor whose presence says the linear `prefix` is stored quantized."""
        if self.kind == "fp8":
            return f"{prefix}.weight_scale"
        return f"{prefix}.weight.absmax" if self.kind == "nf4" else f"{prefix}.weight_packed"

    @property
    def label(self) -> str:
        if self.kind == "fp8":
            how = (
                f"blocks of {self.fp8.block[0]} x {self.fp8.block[1]}" if self.fp8.block else f"per {self.fp8.strategy}"
            )
            return f"FP8 e4m3, scales {how} (compressed-tensors float-quantized)"
        if self.kind == "nf4":
            return f"NF4 block {self.group_size} (bitsandbytes)"
        return f"INT4 group {self.group_size} {'symmetric' if self.symmetric else 'asymmetric'}"

    def config(self, ignore: list[str], int8_lm_head: bool = False) -> dict:
        """The `quantization_config` entry of config.json; `int8_lm_head`: with a second group for
        an lm_head stored in INT8 blocks of 32 (int-quantized; the whole then "mixed-precision")."""
        if self.kind == "nf4":
            return {
                "quant_method": "bitsandbytes",
                "load_in_4bit": True,
                "load_in_8bit": False,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": False,
                "bnb_4bit_compute_dtype": "bfloat16",
                "bnb_4bit_quant_storage": "uint8",
                "bnb_4bit_blocksize": self.group_size,  # ours; each tensor's quant_state has it too
                "llm_int8_skip_modules": ignore,
            }
        groups = {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": self.num_bits,
                    "type": "int",
                    "symmetric": self.symmetric,
                    "strategy": "group",
                    "group_size": self.group_size,
                    "dynamic": False,
                    "actorder": None,
                    "observer": "minmax",
                },
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        }
        if int8_lm_head:
            groups["group_1"] = LM_HEAD_GROUP
        return {
            "quant_method": "compressed-tensors",
            "format": "mixed-precision" if int8_lm_head else "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": ignore,
            "kv_cache_scheme": None,
        }

    @classmethod
    def from_config(cls, qc: dict, source: str) -> QuantScheme:
        method = qc.get("quant_method")
        if method == "bitsandbytes":
            if not qc.get("load_in_4bit") or qc.get("bnb_4bit_quant_type") != "nf4":
                raise UserError(f"{source}: of bitsandbytes' formats only 4-bit NF4 is supported")
            if qc.get("bnb_4bit_use_double_quant"):
                raise UserError(f"{source}: NF4 with double quantization is not supported; re-quantize without it")
            return cls(group_size=int(qc.get("bnb_4bit_blocksize", 64)), kind="nf4")
        if method == "compressed-tensors" and qc.get("format") == "float-quantized":
            return cls(group_size=0, num_bits=8, kind="fp8", fp8=Fp8Format.from_weights(_one_group(qc, source), source))
        mixed = method == "compressed-tensors" and qc.get("format") == "mixed-precision"
        if mixed:  # ours: INT4 linears and an INT8 lm_head (LM_HEAD_GROUP), nothing else
            qc = _without_lm_head_group(qc, source)
        if method != "compressed-tensors" or qc.get("format", "pack-quantized") != "pack-quantized":
            raise UserError(
                f"{source}: quantization {method!r} / {qc.get('format')!r} is not supported; "
                "llama4-local reads compressed-tensors pack-quantized INT4 checkpoints"
            )
        w = _one_group(qc, source)
        if w.get("num_bits") != 4 or w.get("type") != "int" or w.get("strategy") != "group":
            raise UserError(
                f"{source}: only 4-bit int group quantization is supported, got "
                f"{w.get('num_bits')}-bit {w.get('type')} {w.get('strategy')}"
            )
        if w.get("actorder") in ("group", "dynamic"):  # columns in activation order, mapped by weight_g_idx
            raise UserError(
                f"{source}: activation ordering 'group' (weight_g_idx) is not supported (compressed-tensors "
                "has dropped it too); use a checkpoint quantized with actorder 'weight' or none, or run "
                "llama4-local quantize on the original"
            )
        return cls(group_size=int(w["group_size"]), symmetric=bool(w.get("symmetric", True)))


def _without_lm_head_group(qc: dict, source: str) -> dict:
    """A mixed-precision config less its INT8 lm_head group: the rest as one pack-quantized
    config (a UserError for mixtures quantize does not write)."""
    groups = qc.get("config_groups") or {}
    rest = {k: g for k, g in groups.items() if not (isinstance(g, dict) and g.get("targets") == [LM_HEAD_TARGET])}
    head = [g for k, g in groups.items() if k not in rest]
    formats = {g.get("format") for g in rest.values() if isinstance(g, dict)}
    if len(head) != 1 or (head[0].get("weights") or {}).get("num_bits") != 8 or formats != {"pack-quantized"}:
        raise UserError(
            f"{source}: of mixed-precision compressed-tensors configs only INT4 pack-quantized linears "
            "with an INT8 lm_head (as llama4-local quantize writes) are supported"
        )
    return {**qc, "format": "pack-quantized", "config_groups": rest}


def _one_group(qc: dict, source: str) -> dict:
    """The weights entry of a compressed-tensors config's single config group."""
    groups = qc.get("config_groups") or {}
    weights = [g.get("weights") for g in groups.values() if isinstance(g, dict) and g.get("weights")]
    if len(weights) != 1:
        raise UserError(f"{source}: expected one quantization config group, found {len(weights)}")
    return weights[0]


def to_tensors(prefix: str, qw) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear named `prefix` (an Int4Weight or an Nf4Weight)."""
    if not isinstance(qw, Int4Weight):
        from . import nf4

        return nf4.to_tensors(prefix, qw)
    out = {
        f"{prefix}.weight_packed": qw.packed.contiguous(),
        f"{prefix}.weight_scale": qw.scale.contiguous(),
        f"{prefix}.weight_shape": torch.tensor(qw.shape, dtype=torch.int64),
    }
    if qw.zero is not None:
        out[f"{prefix}.weight_zero_point"] = pack_int4(qw.zero, dim=0)
    return out


def from_tensors(get, prefix: str, scheme: QuantScheme):
    """Read one quantized linear through `get(name) -> tensor` (an Int4Weight, an Nf4Weight or an
    Fp8Weight)."""
    if scheme.kind == "fp8":
        from . import fp8

        return fp8.from_tensors(get, prefix, scheme.fp8)
    if scheme.kind == "nf4":
        from . import nf4

        return nf4.from_tensors(get, prefix)
    packed = get(f"{prefix}.weight_packed")
    scale = get(f"{prefix}.weight_scale")
    shape = tuple(int(v) for v in get(f"{prefix}.weight_shape").tolist())
    zero = None
    if not scheme.symmetric:
        zero = unpack_int4(get(f"{prefix}.weight_zero_point"), dim=0)[: shape[0]]
    return Int4Weight(packed, scale, zero, shape, scheme.group_size)

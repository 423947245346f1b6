"""Llama 4 text configuration, read from a checkpoint's `config.json`.

Accepts a `Llama4ForConditionalGeneration` config (model_type "llama4", the text part nested
under `text_config`, as Scout ships) and a text-only `Llama4ForCausalLM` config (model_type
"llama4_text"), in both the transformers 4.x spelling (`rope_theta` + `rope_scaling`) and the
5.x spelling (`rope_parameters`). Every layer kind is derived from the config, never from `% 4`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

LLAMA4_TYPES = ("llama4", "llama4_text")


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (Scout: factor 16, low 1, high 1, original 8192)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # each routed expert and the shared expert
    intermediate_size_mlp: int  # dense (non-MoE) layers only; Scout has none
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    # Per-layer kinds, one entry per layer.
    rope_layers: tuple[bool, ...]  # False: a NoPE layer (no RoPE, no qk-norm, temperature tuning)
    chunked_layers: tuple[bool, ...]  # True: attention limited to aligned blocks of attention_chunk_size
    moe_layers: tuple[bool, ...]  # False: a dense SwiGLU MLP of intermediate_size_mlp
    attention_chunk_size: int | None
    use_qk_norm: bool
    attn_temperature_tuning: bool  # Scout stores the int 4; any truthy value turns it on
    floor_scale: int
    attn_scale: float
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    tie_word_embeddings: bool
    multimodal: bool  # saved as Llama4ForConditionalGeneration (weights under language_model.)
    quantization: dict | None = None  # config.json's quantization_config, when the weights are quantized

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> TextConfig:
        """Build from a parsed config.json; unknown keys are ignored."""
        if not isinstance(raw, dict):
            raise UserError(f"{source} is not a JSON object; is this a Hugging Face checkpoint?")
        model_type = raw.get("model_type")
        if model_type not in LLAMA4_TYPES:
            raise UserError(
                f"{source} describes model_type {model_type!r}, not Llama 4; "
                "llama4-local runs Llama 4 checkpoints (model_type 'llama4' or 'llama4_text')"
            )
        multimodal = model_type == "llama4"
        top_tie = raw.get("tie_word_embeddings")
        if multimodal:
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise UserError(f"{source} has model_type 'llama4' but no text_config object")
        else:
            text = raw

        def need(key):
            if key not in text:
                raise UserError(f"{source} lacks {key!r}, which every Llama 4 text config has")
            return text[key]

        try:
            n_layers = int(need("num_hidden_layers"))
            hidden = int(need("hidden_size"))
            n_heads = int(need("num_attention_heads"))
            n_kv = int(text.get("num_key_value_heads") or n_heads)
            head_dim = int(text.get("head_dim") or hidden // n_heads)
            theta, scaling = _rope(text, source)

            # no_rope_layers: 1 = uses RoPE. Absent: transformers puts a NoPE layer every
            # no_rope_layer_interval layers (default 4).
            nrl = text.get("no_rope_layers")
            if not nrl:
                interval = int(text.get("no_rope_layer_interval", 4))
                nrl = [int((i + 1) % interval != 0) for i in range(n_layers)]
            if len(nrl) < n_layers:
                raise UserError(f"{source}: no_rope_layers has {len(nrl)} entries for {n_layers} layers")
            rope_layers = tuple(bool(x) for x in nrl[:n_layers])

            # moe_layers wins over interleave_moe_layer_step (Maverick: step 2 -> layers 1, 3, ...).
            moe = text.get("moe_layers")
            if moe is None:
                step = int(text.get("interleave_moe_layer_step", 1))
                if step < 1:
                    raise UserError(f"{source}: interleave_moe_layer_step must be >= 1, got {step}")
                moe = range(step - 1, n_layers, step)
            moe_set = {int(i) for i in moe}
            moe_layers = tuple(i in moe_set for i in range(n_layers))

            chunk = text.get("attention_chunk_size")
            chunk = int(chunk) if chunk else None
            # transformers masks "chunked_attention" layers with the chunked mask; by default
            # those are the RoPE layers. An explicit layer_types list is honoured.
            layer_types = text.get("layer_types")
            if layer_types:
                chunked = tuple(t == "chunked_attention" for t in layer_types[:n_layers])
            else:
                chunked = rope_layers
            if chunk is None:
                chunked = tuple(False for _ in range(n_layers))

            eos = text.get("eos_token_id")
            eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
            tie = text.get("tie_word_embeddings")
            if tie is None:
                tie = top_tie if top_tie is not None else False

            cfg = cls(
                vocab_size=int(need("vocab_size")),
                hidden_size=hidden,
                intermediate_size=int(need("intermediate_size")),
                intermediate_size_mlp=int(text.get("intermediate_size_mlp", 16384)),
                num_layers=n_layers,
                num_heads=n_heads,
                num_kv_heads=n_kv,
                head_dim=head_dim,
                num_experts=int(text.get("num_local_experts", 16)),
                top_k=int(text.get("num_experts_per_tok", 1)),
                rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
                rope_theta=theta,
                rope_scaling=scaling,
                rope_layers=rope_layers,
                chunked_layers=chunked,
                moe_layers=moe_layers,
                attention_chunk_size=chunk,
                use_qk_norm=bool(text.get("use_qk_norm", True)),
                attn_temperature_tuning=bool(text.get("attn_temperature_tuning", True)),
                floor_scale=int(text.get("floor_scale", 8192)),
                attn_scale=float(text.get("attn_scale", 0.1)),
                max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
                bos_token_id=text.get("bos_token_id"),
                eos_token_ids=eos_ids,
                pad_token_id=text.get("pad_token_id"),
                tie_word_embeddings=bool(tie),
                multimodal=multimodal,
                quantization=raw.get("quantization_config") or text.get("quantization_config"),
            )
        except (TypeError, ValueError) as e:
            raise UserError(f"{source} has a malformed value ({e}); is it a Llama 4 config?") from None
        cfg._validate(source)
        return cfg

    def _validate(self, source: str) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"{source}: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UserError(f"{source}: head_dim={self.head_dim} must be even for RoPE")
        if any(self.moe_layers) and not 1 <= self.top_k <= self.num_experts:
            raise UserError(
                f"{source}: num_experts_per_tok={self.top_k} must be between 1 and num_local_experts={self.num_experts}"
            )
        if self.floor_scale < 1:
            raise UserError(f"{source}: floor_scale={self.floor_scale} must be >= 1")


def _rope(text: dict, source: str) -> tuple[float, RopeScaling | None]:
    """(theta, llama3 scaling or None) from either the 4.x or the 5.x spelling."""
    params = text.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", text.get("rope_theta", 500000.0))
        scaling = params
    else:
        theta = text.get("rope_theta", 500000.0)
        scaling = text.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise UserError(f"{source}: rope type {kind!r} is not supported (Llama 4 uses 'llama3' or none)")
    try:
        return float(theta), RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise UserError(f"{source}: llama3 rope scaling lacks {e.args[0]!r}") from None


class _NonFinite(ValueError):
    pass


def _no_constant(name: str):
    # Python's json reads NaN and Infinity, which JSON does not have; a config never needs them.
    raise _NonFinite(name)


def read_json(path: Path) -> dict:
    """Parse a JSON file, turning a broken one into a UserError that names it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, parse_constant=_no_constant)
    except _NonFinite as e:
        raise UserError(f"{path} holds {e.args[0]}, which is not a number; re-download it or fix the value") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-download it") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; re-download it") from None


def load_config(model_dir: Path) -> TextConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no config.json; point --model at a Hugging Face checkpoint directory")
    return TextConfig.from_hf(read_json(path), source=str(path))

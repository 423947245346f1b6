"""config.json parsing: Scout's real config, both spellings, layer kinds from the config."""

import copy
import json
from pathlib import Path

import pytest

from llama4_local.config import TextConfig
from llama4_local.errors import UserError

# A copy of ../shared/fixtures/scout-instruct-config.json: Scout Instruct's config as published.
FIXTURE = Path(__file__).parent / "data" / "scout-instruct-config.json"


@pytest.fixture
def scout_raw():
    return json.loads(FIXTURE.read_text())


def test_scout_instruct_config(scout_raw):
    cfg = TextConfig.from_hf(scout_raw)
    assert cfg.multimodal
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (48, 5120, 40, 8, 128)
    assert (cfg.num_experts, cfg.top_k, cfg.intermediate_size, cfg.vocab_size) == (16, 1, 8192, 202048)
    assert cfg.rope_layers == (True, True, True, False) * 12
    assert [i for i, r in enumerate(cfg.rope_layers) if not r] == list(range(3, 48, 4))
    assert cfg.chunked_layers == cfg.rope_layers
    assert all(cfg.moe_layers)
    assert cfg.attention_chunk_size == 8192
    assert cfg.use_qk_norm and cfg.attn_temperature_tuning  # stored as the int 4
    assert (cfg.floor_scale, cfg.attn_scale) == (8192, 0.1)
    assert cfg.rope_theta == 500000.0
    s = cfg.rope_scaling
    assert (s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) == (16, 1, 1, 8192)
    assert cfg.eos_token_ids == (200001, 200007, 200008)
    assert cfg.bos_token_id == 200000
    assert not cfg.tie_word_embeddings


def test_5x_spelling_is_the_same(scout_raw):
    raw = copy.deepcopy(scout_raw)
    t = raw["text_config"]
    t["rope_parameters"] = {"rope_type": "llama3", "rope_theta": t.pop("rope_theta"), **t.pop("rope_scaling")}
    t["attn_temperature_tuning"] = True
    assert TextConfig.from_hf(raw) == TextConfig.from_hf(scout_raw)


def test_text_only_and_interleaved(scout_raw):
    t = copy.deepcopy(scout_raw["text_config"])
    del t["moe_layers"]
    t["interleave_moe_layer_step"] = 2
    t["use_qk_norm"] = False
    t["attn_temperature_tuning"] = 0
    cfg = TextConfig.from_hf(t)
    assert not cfg.multimodal
    assert [i for i, m in enumerate(cfg.moe_layers) if m] == list(range(1, 48, 2))
    assert not cfg.use_qk_norm and not cfg.attn_temperature_tuning


def test_defaults_when_layer_lists_absent(scout_raw):
    t = copy.deepcopy(scout_raw["text_config"])
    del t["no_rope_layers"], t["moe_layers"]
    t["num_hidden_layers"] = 8
    cfg = TextConfig.from_hf(t)
    assert cfg.rope_layers == (True, True, True, False) * 2
    assert all(cfg.moe_layers)


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"model_type": "llama", "hidden_size": 4096}, "not Llama 4"),
        ({"model_type": "llama4"}, "text_config"),
        ({"model_type": "llama4_text", "hidden_size": 64}, "num_hidden_layers"),
        ([1, 2], "JSON object"),
    ],
)
def test_not_llama4(raw, words):
    with pytest.raises(UserError, match=words):
        TextConfig.from_hf(raw)


def test_bad_values(scout_raw):
    raw = copy.deepcopy(scout_raw)
    raw["text_config"]["num_key_value_heads"] = 7
    with pytest.raises(UserError, match="multiple"):
        TextConfig.from_hf(raw)
    raw = copy.deepcopy(scout_raw)
    raw["text_config"]["rope_scaling"]["rope_type"] = "yarn"
    with pytest.raises(UserError, match="yarn"):
        TextConfig.from_hf(raw)


# Maverick Instruct's config.json as published: TensorRT-LLM's tests carry it
# (LLAMA_4_MAVERICK_TWO_LAYER_CONFIG) with two marked changes, undone here: 48 layers, not 2,
# and no added no_rope_layer_interval (the vision tower's 34 layers likewise).
MAVERICK = Path(__file__).parent / "data" / "maverick-instruct-config.json"


def test_maverick_instruct_config():
    raw = json.loads(MAVERICK.read_text())
    cfg = TextConfig.from_hf(raw)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (48, 5120, 40, 8, 128)
    assert (cfg.num_experts, cfg.top_k, cfg.intermediate_size, cfg.intermediate_size_mlp) == (128, 1, 8192, 16384)
    assert [i for i, m in enumerate(cfg.moe_layers) if m] == list(range(1, 48, 2))  # dense layers between
    assert not cfg.use_qk_norm and cfg.rope_scaling is None and cfg.rope_theta == 500000.0
    assert [i for i, r in enumerate(cfg.rope_layers) if not r] == list(range(3, 48, 4))
    assert cfg.attn_temperature_tuning and (cfg.floor_scale, cfg.attn_scale) == (8192, 0.1)  # transformers' defaults
    assert cfg.max_position_embeddings == 1048576 and cfg.multimodal


def test_maverick_layer_kinds_match_transformers():
    """The oracle's reading of the same file: which layers are MoE and which skip RoPE."""
    from transformers import Llama4Config

    raw = json.loads(MAVERICK.read_text())
    ours = TextConfig.from_hf(raw)
    theirs = Llama4Config.from_dict(raw).text_config
    assert [i for i, m in enumerate(ours.moe_layers) if m] == list(theirs.moe_layers)
    assert [int(r) for r in ours.rope_layers] == list(theirs.no_rope_layers)
    assert ours.use_qk_norm == theirs.use_qk_norm

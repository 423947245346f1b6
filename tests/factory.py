"""Tiny Llama 4 checkpoints for tests, written in the real Hugging Face layout.

Weights are random, saved by transformers' own `save_pretrained` (so the layout is the real
one); the tokenizer is a small byte-level BPE trained here with `tokenizers`, carrying Llama 4's
special tokens, BOS post-processor and chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|finetune_right_pad|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
]

# Llama 4 Instruct's chat template, as its tokenizer_config.json carries it (tool-calling
# branches shortened): system message first, then each turn, then the assistant header.
CHAT_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content']|trim %}
    {%- else %}
        {%- set system_message = messages[0]['content'][0]['text']|trim %}
    {%- endif %}
    {%- set messages = messages[1:] %}
    {%- set user_supplied_system_message = true %}
{%- else %}
    {%- set system_message = "" %}
    {%- set user_supplied_system_message = false %}
{%- endif %}
{%- if user_supplied_system_message %}
    {{- "<|header_start|>system<|header_end|>\\n\\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\\n" }}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- "<|eot|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|header_start|>ipython<|header_end|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|header_start|>assistant<|header_end|>\\n\\n' }}
{%- endif %}
"""

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Llama 4 Scout is a mixture of experts with sixteen experts and one shared expert.",
    "Attention is chunked on RoPE layers and global on NoPE layers.",
    "def hello(name):\n    return f'Hello, {name}!'\n",
    "Ünïcödé text: naïve café, 日本語のテキスト, emoji 🦙🔥 and math ∑ x² ≤ ∞.",
    "Numbers 0123456789 and punctuation !?.,;:()[]{}<>",
]


def write_tokenizer(out: Path, vocab_size: int = 320, texts: list[str] | None = None) -> dict[str, int]:
    """Train a byte-level BPE on `texts` (default: a small corpus), add Llama 4's specials, BOS
    post-processor and chat template; returns special token -> id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20 if texts is None else texts, trainer)
    tok.add_special_tokens(SPECIALS)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids[bos])]
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": bos,
                "eos_token": "<|eot|>",
                "pad_token": "<|finetune_right_pad|>",
                "model_max_length": 1000000,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=1,
        )
    )
    return ids


def text_config(ids: dict[str, int], kind: str = "scout", vocab_size: int = 384) -> dict:
    """A tiny Llama 4 text config (5.x spelling) of one of three kinds."""
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=128,  # divisible by every INT4 group size (32, 64, 128)
        intermediate_size=128,
        intermediate_size_mlp=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        attention_chunk_size=8,
        floor_scale=16,
        attn_scale=0.1,
        max_position_embeddings=4096,
        initializer_range=0.08,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]],
        pad_token_id=ids["<|finetune_right_pad|>"],
        tie_word_embeddings=False,
    )
    if kind == "scout":  # every layer MoE, qk-norm, llama3 scaling with a sharp split
        cfg.update(
            use_qk_norm=True,
            interleave_moe_layer_step=1,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=16.0,
                low_freq_factor=1.0,
                high_freq_factor=1.0,
                original_max_position_embeddings=32,
            ),
        )
    elif kind == "maverick":  # dense and MoE interleaved, no qk-norm, 8 experts
        cfg.update(
            use_qk_norm=False,
            interleave_moe_layer_step=2,
            num_local_experts=8,
            rope_parameters=dict(rope_type="default", rope_theta=500000.0),
        )
    elif kind == "top2":  # two experts per token, llama3 scaling with a smooth band
        cfg.update(
            use_qk_norm=True,
            num_experts_per_tok=2,
            moe_layers=[0, 2, 3],
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        )
    else:
        raise ValueError(kind)
    return cfg


def vision_config() -> dict:
    """A tiny vision tower: 56-pixel tiles of 4x4 patches, 4 tokens per tile after pixel shuffle."""
    return dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,  # hidden_size / pixel_shuffle_ratio^2, as Scout's 5632 = 4 x 1408
        image_size=56,
        patch_size=14,
        pixel_shuffle_ratio=0.5,
        vision_output_dim=48,
        projector_input_dim=48,
        projector_output_dim=48,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        initializer_range=0.1,
    )


# Scout's preprocessor_config.json, with the tile size of the tiny tower and at most 6 tiles.
PREPROCESSOR = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Llama4ImageProcessorFast",
    "image_std": [0.5, 0.5, 0.5],
    "max_patches": 6,
    "processor_class": "Llama4Processor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "resize_to_max_canvas": False,
    "size": {"height": 56, "width": 56},
}


def to_4x_spelling(text: dict) -> dict:
    """Rewrite a text config the way transformers 4.x wrote it (Scout on the hub)."""
    text = dict(text)
    rp = dict(text.pop("rope_parameters"))
    text["rope_theta"] = rp.pop("rope_theta")
    text["rope_scaling"] = None if rp.get("rope_type") == "default" else rp
    text["attn_temperature_tuning"] = 4  # Scout stores an int
    text.pop("layer_types", None)
    return text


def write_checkpoint(
    out: Path,
    kind: str = "scout",
    multimodal: bool = False,
    dtype: torch.dtype = torch.float32,
    shard_size: str | None = None,
    spelling: str = "5.x",
    seed: int = 0,
    generation_config: dict | None = None,
) -> Path:
    """Write a random tiny checkpoint and its tokenizer into `out`; returns `out`."""
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    out = Path(out)
    ids = write_tokenizer(out)
    tc = text_config(ids, kind)
    torch.manual_seed(seed)
    if multimodal:
        config = Llama4Config(
            text_config=tc,
            vision_config=vision_config(),
            boi_token_index=ids["<|image_start|>"],
            eoi_token_index=ids["<|image_end|>"],
            image_token_index=ids["<|patch|>"],
        )
        model = Llama4ForConditionalGeneration(config)
    else:
        model = Llama4ForCausalLM(Llama4TextConfig(**tc))
    if dtype != torch.float32:
        model = model.to(dtype)
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out, **kw)
    if multimodal:
        (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    if spelling == "4.x":
        path = out / "config.json"
        cfg = json.loads(path.read_text())
        if multimodal:
            cfg["text_config"] = to_4x_spelling(cfg["text_config"])
        else:
            cfg = to_4x_spelling(cfg)
        path.write_text(json.dumps(cfg, indent=1))
    gen = out / "generation_config.json"
    if generation_config is not None:
        gen.write_text(json.dumps(generation_config))
    elif gen.exists():
        gen.unlink()
    return out


def load_reference(path: Path, dtype: torch.dtype = torch.float32):
    """transformers' model for a checkpoint written here (the oracle).

    transformers 5 rejects the int that Scout stores for attn_temperature_tuning; the config is
    handed over with that value as a bool, which is what it means.
    """
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    raw = json.loads((Path(path) / "config.json").read_text())
    text = raw.get("text_config", raw)
    if "attn_temperature_tuning" in text:
        text["attn_temperature_tuning"] = bool(text["attn_temperature_tuning"])
    if raw["model_type"] == "llama4":
        cls, cfg = Llama4ForConditionalGeneration, Llama4Config.from_dict(raw)
    else:
        cls, cfg = Llama4ForCausalLM, Llama4TextConfig.from_dict(raw)
    return cls.from_pretrained(path, config=cfg, dtype=dtype).eval()

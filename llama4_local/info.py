"""`llama4-local info`: what a checkpoint is, and how it would be laid out in memory."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import open_checkpoint
from .config import TextConfig, load_config
from .errors import UserError
from .loader import quantized_parts


def text_parameters(cfg: TextConfig) -> tuple[int, int, int]:
    """(total, active per token, routed experts) parameters of the language model."""
    d, hd = cfg.hidden_size, cfg.head_dim
    total = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d
    active = total
    routed_total = 0
    for layer in range(cfg.num_layers):
        attn = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2 + 2 * d
        total += attn
        active += attn
        if cfg.moe_layers[layer]:
            one = 3 * d * cfg.intermediate_size
            shared_and_router = one + cfg.num_experts * d
            routed_total += cfg.num_experts * one
            total += shared_and_router + cfg.num_experts * one
            active += shared_and_router + cfg.top_k * one
        else:
            mlp = 3 * d * cfg.intermediate_size_mlp
            total += mlp
            active += mlp
    return total, active, routed_total


def machine_info() -> dict:
    """What this machine runs a model with: the CPU, its physical cores (the default --threads),
    the instruction set the CPU kernels are built for (None where they are not used, and why), how many inputs
    share one int8 activation scale at INT4 groups of 128 in bf16 runs (32, or 128 on AVX2
    without VNNI), whether it multiplies bf16 natively, from how many rows an INT4 product goes
    through bf16 GEMMs (0: never; AMX CPUs), the RAM available now, and the first GPU, if any."""
    import torch

    from quant import cpu_kernel

    from .loader import available_memory
    from .threads import cpu_name, physical_cores

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory": props.total_memory}
    kern = cpu_kernel.available()  # builds it on a first run (about a minute)
    return {
        "cpu": cpu_name(),
        "physical_cores": physical_cores(),
        "cpu_kernels": cpu_kernel.isa() if kern else None,
        "cpu_kernels_missing": cpu_kernel.unavailable_reason(),
        "int8_activation_span": cpu_kernel.int8_span(128) if kern else None,
        "native_bf16": cpu_kernel.native_bf16(),
        "int4_bf16_gemm_from_rows": cpu_kernel.bf16_gemm_rows() if kern else 0,
        "int4_outer_from_rows": cpu_kernel.outer_rows() if kern else 0,
        "bf16_dot_decode": kern and cpu_kernel.half_bf16_dot_default(),
        "available_memory": available_memory(),
        "gpu": gpu,
    }


def model_info(path: Path, budgets: list[int], context: int, hosts: list[int | None] | None = None) -> dict:
    """What `info` prints; a memory plan per GPU budget and host-RAM budget for experts (None:
    every expert that this machine's available RAM holds, as a run here would keep)."""
    from offload.plan import plan_memory

    from .loader import available_memory

    cfg = load_config(path)
    context = min(context, cfg.max_position_embeddings)
    try:
        ckpt = open_checkpoint(path)
    except UserError:
        ckpt = None  # a config alone still describes the model and plans its memory
    vision = 0
    total, active, routed = text_parameters(cfg)
    # Vision tower and projector are outside the text model's names: count them from the files.
    from safetensors import safe_open

    files = sorted(set(Path(f) for f in path.glob("*.safetensors")))
    for f in files:
        with safe_open(f, "pt") as h:
            for key in h.keys():
                if "vision_model" in key or "multi_modal_projector" in key:
                    n = 1
                    for s in h.get_slice(key).get_shape():
                        n *= s
                    vision += n
    scheme = None
    if cfg.quantization:
        from quant.format import QuantScheme

        scheme = QuantScheme.from_config(cfg.quantization, str(path / "config.json"))
    if ckpt is not None:
        q = quantized_parts(ckpt, cfg, scheme)
    elif scheme is not None:  # no weights to look at: read the parts from the ignore list
        from offload.plan import Quantized

        qc = cfg.quantization
        ignore = " ".join(qc.get("ignore") or qc.get("llm_int8_skip_modules") or [])
        from quant.quantize import DENSE_IGNORE

        dense = DENSE_IGNORE not in ignore and "feed_forward.gate_proj" not in ignore
        q = Quantized(
            scheme.group_size, True, "shared_expert" not in ignore, "self_attn" not in ignore, scheme.kind, dense
        )
    else:
        q = None
    quant = None
    if q is not None:
        parts = [p for p in ("experts", "shared", "mlp", "attention") if getattr(q, p)]
        from quant.head import sidecar_kind

        quant = {
            "scheme": scheme.label,
            "parts": parts,
            "lm_head_cpu": sidecar_kind(path),  # the head's blocks a bf16 CPU run maps (quant/head.py)
        }
    from .vision import VisionConfig, vision_parameters, vision_plan_bytes

    vcfg = VisionConfig.from_dir(path) if cfg.multimodal else None
    head_q6 = 0  # a GPU run beside an expert cache reads a Q6 sidecar's head (quant/triton_q6.py)
    if ckpt is not None and scheme is not None:
        from quant.head import gpu_head_bytes

        head_q6 = gpu_head_bytes(path, ckpt, cfg.vocab_size, cfg.hidden_size)
    vbytes, streamable = vision_plan_bytes(vcfg, 2) if vcfg is not None else (0, 0)  # what chat loads for /image
    if vcfg is not None and not vision:  # a config without weights: count from the config
        vision = vision_parameters(vcfg)
    plans = []
    for budget in budgets:
        for host in hosts or [None]:
            entry = {"gpu_memory": budget, "host_memory": host}
            try:
                avail = available_memory() if host is None else 0  # as a run here would bound it
                plan = plan_memory(
                    cfg,
                    budget,
                    context,
                    2,
                    q,
                    host_budget=host,
                    vision=vbytes,
                    available=avail,
                    vision_host=streamable,
                    head_q6=head_q6,
                )
                plans.append({**entry, "plan": plan.as_dict(), "rows": plan.rows()})
            except UserError as e:  # a budget too small is information here, not an error
                plans.append({**entry, "error": str(e)})
    return {
        "path": str(path),
        "architecture": "Llama4ForConditionalGeneration" if cfg.multimodal else "Llama4ForCausalLM",
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "experts": cfg.num_experts,
        "experts_per_token": cfg.top_k,
        "moe_layers": sum(cfg.moe_layers),
        "nope_layers": [i for i, r in enumerate(cfg.rope_layers) if not r],
        "attention_chunk_size": cfg.attention_chunk_size,
        "vocab_size": cfg.vocab_size,
        "max_context": cfg.max_position_embeddings,
        "parameters_total": total + vision,
        "parameters_text": total,
        "parameters_vision": vision,
        "parameters_active": active,
        "parameters_routed_experts": routed,
        "quantization": quant,
        "bytes_on_disk": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "context_planned": context,
        "plans": plans,
        "machine": machine_info(),
    }

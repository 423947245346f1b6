"""The rich tables `info` and `bench` print (cli.py)."""

from __future__ import annotations

from .cli_common import binary, count, human


def print_info(res: dict, name: str) -> None:
    """`info`: the checkpoint's table, then one table per memory plan."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=name, show_header=False)
    t.add_column("what")
    t.add_column("value")
    b = count
    t.add_row("architecture", res["architecture"])
    t.add_row("layers", f"{res['layers']} ({res['moe_layers']} MoE, NoPE at {res['nope_layers']})")
    t.add_row("hidden / heads / kv heads", f"{res['hidden_size']} / {res['heads']} / {res['kv_heads']}")
    t.add_row("experts", f"{res['experts']} routed, {res['experts_per_token']} per token, + 1 shared")
    t.add_row("parameters", f"{b(res['parameters_total'])} total, {b(res['parameters_active'])} active per token")
    if res["parameters_vision"]:
        t.add_row("vision", b(res["parameters_vision"]))
    q = res["quantization"]
    t.add_row("quantization", f"{q['scheme']} ({', '.join(q['parts'])})" if q else "none (bf16/fp16 weights)")
    if q and q.get("lm_head_cpu"):
        t.add_row("lm_head on the CPU", q["lm_head_cpu"])
    t.add_row("on disk", human(res["bytes_on_disk"]))
    t.add_row("context", f"{res['max_context']} max; plans below for {res['context_planned']}")
    t.add_row("this machine", machine_line(res["machine"]))
    con.print(t)
    for p in res["plans"]:
        title = f"memory plan for {p['gpu_memory'] / 2**30:.1f} GiB of GPU memory"
        if p["host_memory"] is not None:
            title += f" and {p['host_memory'] / 2**30:.1f} GiB of host RAM for experts"
        if "error" in p:
            con.print(f"[bold]{title}[/bold]: {p['error']}")
            continue
        pt = Table(title=title)
        pt.add_column("what")
        pt.add_column("where")
        pt.add_column("size", justify="right")
        for what, where, n in p["rows"]:
            pt.add_row(what, where, binary(n))
        con.print(pt)


def machine_line(m: dict) -> str:
    """info's summary of machine_info(): CPU, kernels, RAM, GPU."""
    kernels = f"{m['cpu_kernels']} kernels" if m["cpu_kernels"] else f"stock kernels ({m['cpu_kernels_missing']})"
    if m.get("int8_activation_span"):
        kernels += f" (int8 activations per {m['int8_activation_span']})"
    if m["native_bf16"]:
        kernels += ", bf16 GEMMs"
    if m["int4_bf16_gemm_from_rows"]:
        kernels += f" (INT4 prefill from {m['int4_bf16_gemm_from_rows']} rows)"
    if m.get("int4_outer_from_rows"):
        kernels += f", INT4 prefill from {m['int4_outer_from_rows']} rows by outer-product tiles"
    if m.get("bf16_dot_decode"):
        kernels += ", bf16 decode by vdpbf16ps"
    line = f"{m['cpu']}, {m['physical_cores']} cores, {kernels}; {binary(m['available_memory'])} RAM available"
    gpu = m["gpu"]
    return line + (f"; GPU {gpu['name']} ({binary(gpu['memory'])})" if gpu else "; no GPU")


def print_bench(res: dict, title: str) -> None:
    """`bench`: prefill and decode with their expert cache figures, then peak memory."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("phase")
    table.add_column("tokens", justify="right")
    table.add_column("tok/s", justify="right")
    table.add_column("cache hits", justify="right")
    table.add_column("on CPU", justify="right")
    table.add_column("prefetch right", justify="right")
    table.add_column("moved", justify="right")
    for phase in ("prefill", "decode"):
        p = res[phase]
        c = p.get("expert_cache")
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        table.add_row(
            phase,
            str(p["tokens"]),
            f"{p['tok_s']:.2f}",
            pct(c["hit_rate"]) if c else "-",
            str(c["cpu"]) if c else "-",
            pct(c["prefetch_accuracy"]) if c else "-",
            human(c["bytes_moved"]) if c else "-",
        )
    con = Console()
    con.print(table)
    mem = f"peak RSS {human(res['peak_rss_bytes'])}"
    if res["peak_gpu_bytes"] is not None:
        mem += f", peak GPU {human(res['peak_gpu_bytes'])}"
    if "offload" in res:
        o = res["offload"]
        mem += f"; expert cache {o['slots']} of {o['experts']} experts ({o['policy']}, misses {o['miss_policy']})"
    con.print(mem)

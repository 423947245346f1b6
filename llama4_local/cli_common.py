"""What the `llama4-local` commands share (cli.py): option types, sampling and offload
options, reading stdin, and turning failures into one line and an exit code (0 success, 1
runtime failure, 2 bad usage or input, 130 interrupted). Imports nothing heavy: `--help`
answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Checkpoint directory (Hugging Face layout), or a hub repo id "
        "like meta-llama/Llama-4-Scout-17B-16E-Instruct.",
    ),
]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of a repo id model.")]

TemperatureOpt = Annotated[float | None, typer.Option(help="0 means greedy (default: checkpoint's).")]
TopKOpt = Annotated[int | None, typer.Option(help="Keep the k most likely tokens (0: off).")]
TopPOpt = Annotated[float | None, typer.Option(help="Nucleus sampling threshold.")]
MinPOpt = Annotated[float | None, typer.Option(help="Drop tokens below min_p x the top probability.")]
RepetitionOpt = Annotated[float | None, typer.Option(help="Penalise tokens already seen (1: off).")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed for reproducible sampling.")]
DtypeOpt = Annotated[str, typer.Option(help="bfloat16, float16 or float32.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
PrefillChunkOpt = Annotated[int, typer.Option(help="Prompt tokens per prefill step (bounds memory).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks.")]
Int8AttentionOpt = Annotated[
    bool,
    typer.Option(
        "--int8-attention/--bf16-attention",
        help="CPU bf16/fp16 runs: attention weights rounded to INT8 at load (half the bytes; see docs/benchmarks.md).",
    ),
]
MmapOpt = Annotated[
    bool | None,
    typer.Option(
        "--mmap/--no-mmap",
        help="CPU runs: keep weights as views of the mapped files (--mmap: fastest start, least memory) or "
        "copy them into RAM (--no-mmap: huge pages, the fastest decode after a slower load). Default: keep "
        "the mapping where the page cache serves it in 2 MB pages (Linux 6.16+ on ext4), else copy when it fits.",
    ),
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", "-t", help="CPU threads for computing (default: the physical cores).")
]
SessionContextOpt = Annotated[int | None, typer.Option(help="Context length in tokens (default: 8192).")]
VisionOpt = Annotated[
    bool,
    typer.Option(help="Load the vision tower (when the checkpoint has one) for images; about 2 GB for Scout."),
]


def _sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed) -> dict:
    """The sampling options as SamplingParams overrides (None keeps the checkpoint's value)."""
    return dict(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed
    )


def _model(model: str, revision: str | None = None) -> Path:
    """A local directory, or a hub repo id fetched into the Hugging Face cache."""
    from llama4_local.hub import resolve_model

    return resolve_model(model, revision)


_OFF = "Offloading"
GpuMemoryOpt = Annotated[
    str | None,
    typer.Option(help="GPU memory to plan for, e.g. 24GiB (default: free memory minus 1 GiB).", rich_help_panel=_OFF),
]
HostMemoryOpt = Annotated[
    str | None,
    typer.Option(
        help="Host RAM for expert copies; beyond it experts are read from disk (default: what is available).",
        rich_help_panel=_OFF,
    ),
]
SlotsOpt = Annotated[
    int | None,
    typer.Option(
        help="Experts kept on the compute device (overrides the plan; works with --device cpu).", rich_help_panel=_OFF
    ),
]
PolicyOpt = Annotated[
    str,
    typer.Option(
        help="Expert cache eviction: lru, lfu, or auto (lfu for 64+ experts per layer, else lru).",
        rich_help_panel=_OFF,
    ),
]
MissOpt = Annotated[
    str,
    typer.Option(
        help="A missing expert is copied (swap), run on the CPU (cpu), or either (auto).", rich_help_panel=_OFF
    ),
]
PrefetchOpt = Annotated[
    bool,
    typer.Option(
        "--prefetch/--no-prefetch", help="Guess the next layer's experts and copy them early.", rich_help_panel=_OFF
    ),
]
ContextOpt = Annotated[
    int | None, typer.Option(help="Context length the memory plan reserves KV cache for.", rich_help_panel=_OFF)
]


def _offload_options(gpu_memory, host_memory, slots, policy, miss_policy, prefetch):
    from offload.setup import OffloadOptions

    return OffloadOptions(
        slots=slots,
        gpu_memory=_parse_size(gpu_memory) if gpu_memory else None,
        host_memory=_parse_size(host_memory) if host_memory else None,
        policy=policy,
        miss_policy=miss_policy,
        prefetch=prefetch,
    ).validate()


def _read_stdin() -> str:
    from llama4_local.errors import UserError

    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"standard input is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
            "convert it first, e.g. with iconv -t UTF-8"
        ) from None


def _threads(n: int | None) -> None:
    from llama4_local.threads import set_threads

    set_threads(n)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise typer.Exit(code)


def _run(fn, verbose: bool):
    """Call fn, turning user errors into one line and exit 2, other failures into exit 1."""
    from llama4_local.errors import UserError

    try:
        return fn()
    except UserError as e:
        _fail(str(e), 2)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        raise typer.Exit(130) from None
    except (typer.Exit, SystemExit):
        raise
    except Exception as e:
        if verbose:
            raise
        name = type(e).__name__
        msg = str(e).splitlines()[0] if str(e) else name
        _fail(f"{name}: {msg} (run again with --verbose for details)", 1)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def binary(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _parse_size(text: str) -> int:
    from llama4_local.errors import UserError

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        return int(float(num) * units[t[len(num) :]])
    except (KeyError, ValueError):
        raise UserError(f"cannot read size {text!r}; write it like 2GB, 512MiB or 1000000") from None

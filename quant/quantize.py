"""Quantize a Llama 4 checkpoint to INT4 and save it, tensor by tensor, with bounded memory.

Reads the source memory-mapped, one shard at a time, quantizes one expert matrix at a time, and
writes output shards as they fill, so peak memory is about two output shards (the shard and
its serialised copy) plus one expert's working set, whatever the checkpoint's size.
Everything goes into a hidden directory next to OUT that is renamed to OUT only when complete:
an interrupted run leaves nothing that looks like a checkpoint, and a re-run resumes from the
output shards it finished (quant/resume.py).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

from llama4_local.checkpoint import HEAD_SIDECAR, INDEX_NAME, list_tensors
from llama4_local.config import load_config, read_json
from llama4_local.errors import UserError
from llama4_local.loader import check_model_dir

from .calibrate import DEFAULT_TOKENS
from .format import QuantScheme, to_tensors
from .gptq import gptq_int4
from .head import write_head_sidecar
from .int4 import GROUP_SIZES, quantize_int4
from .kernels import q8_blocks
from .resume import WorkDir, remove_old_partials, source_fingerprint
from .shard_file import Spill, Spilled, write_shard

# "mlp": the dense SwiGLU MLPs of the layers without experts (Maverick's every other layer).
PARTS = ("experts", "shared", "attention", "mlp")
DEFAULT_PARTS = ("experts", "shared", "mlp")  # and attention when calibrating: see default_parts
# Files copied from the source as they are (tokenizer, chat template, generation defaults, ...).
COPY_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".md")
SKIP_FILES = {"config.json", INDEX_NAME}
_ATTENTION = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
)
_SHARED = ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight", "shared_expert.down_proj.weight")
_UNFUSED_EXPERT = re.compile(r"\.experts\.\d+\.(gate|up|down)_proj\.weight$")
_FP8_COMPANIONS = (".weight_scale", ".input_scale")
_DENSE = ("feed_forward.gate_proj.weight", "feed_forward.up_proj.weight", "feed_forward.down_proj.weight")


@dataclass
class QuantizeOptions:
    group_size: int = 128
    symmetric: bool = True
    parts: tuple[str, ...] | None = None  # None: default_parts
    shard_bytes: int = 2 << 30
    device: str = "cpu"  # where the quantizer's arithmetic runs
    scheme: str = "int4"  # or "nf4" (bitsandbytes)
    # GPTQ against the source model's activations on a calibration text (quant/calibrated.py);
    # INT4 only. Off: each group's plain least-squares fit (quant/int4.py).
    calibrate: bool = True
    calibration_text: Path | None = None  # None: quant/data/calibration.txt
    calibration_tokens: int = DEFAULT_TOKENS
    # The lm_head in INT8 (Q8_0: int8 and a float32 scale per 32 weights, compressed-tensors
    # int-quantized) in place of the original. Off by default: vLLM has no scheme for an
    # int-quantized weight-only head; the default keeps it and writes it in Q6 (Q8_0 without
    # calibration) to a file beside the checkpoint for CPU runs (quant/head.py).
    int8_lm_head: bool = False

    @property
    def gptq(self) -> bool:
        """Whether the run calibrates (GPTQ): INT4 only."""
        return self.calibrate and self.scheme == "int4"


@dataclass
class QuantizeSummary:
    source_bytes: int
    output_bytes: int
    seconds: float
    quantized_linears: int
    shards: int
    files_copied: list[str] = field(default_factory=list)
    resumed_shards: int = 0  # finished shards taken over from an interrupted run


class _ShardWriter:
    """Collects tensors and writes a shard whenever `limit` bytes have gathered.

    Tensors come in units (one source tensor, or one expert of a fused tensor) that never
    straddle two shards, so the work directory can record which units a finished shard holds.
    """

    def __init__(self, work: WorkDir, limit: int):
        self.work, self.limit = work, limit  # work.shards: the finished shards, resumed or written
        self.pending: dict[str, torch.Tensor | Spilled] = {}  # parked on disk until the shard is written
        self.pending_units: list[str] = []
        self.pending_bytes = 0
        self.spill = Spill(work.path / "pending.spill.tmp")  # a .tmp: what a stopped run leaves is removed

    def add(self, tensors: dict[str, torch.Tensor], unit: str) -> None:
        for name, t in tensors.items():
            t = t.contiguous()
            parked = self.spill.put(t)  # its bytes written to the spill file now (a mapped view is fine)
            self.pending[name] = t.clone() if parked is t else parked  # kept in memory: not a view of a map
            self.pending_bytes += t.numel() * t.element_size()
        self.pending_units.append(unit)
        if self.pending_bytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.work.shards):05d}.safetensors"
        tmp = self.work.path / (name + ".tmp")
        written = write_shard(tmp, self.pending, metadata={"format": "pt"})
        self.spill.reset()
        self.work.add_shard(tmp, name, self.pending_units, list(self.pending), self.pending_bytes, written)
        self.pending, self.pending_units, self.pending_bytes = {}, [], 0
        _release_freed_memory()

    def finish(self) -> int:
        """Name shards model-0000i-of-0000n and write the index; returns the shard count."""
        self.flush()
        shards = self.work.shards
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.work.path / shard["file"]).rename(self.work.path / final)
            weight_map.update(dict.fromkeys(shard["tensors"], final))
        total = sum(shard["tensor_bytes"] for shard in shards)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.work.path / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return n


def _expert_prefix(name: str) -> str | None:
    """'...experts.gate_up_proj' / '...experts.down_proj' -> '...experts', else None."""
    for fused in (".experts.gate_up_proj", ".experts.down_proj"):
        if name.endswith(fused):
            return name[: -len(fused)] + ".experts"
    return None


def default_parts(cfg, opts: QuantizeOptions) -> tuple[str, ...]:
    """What `quantize` takes when not told: experts, shared experts, dense MLPs and, with GPTQ
    (INT4, calibrated), attention too. Attention's plain fit costs 1.3x llama.cpp Q4_K_M's KL on
    the trained model, its GPTQ fit a small part of it (docs/benchmarks.md). Attention is left
    out where the group does not divide its output projection's input (tiny models)."""
    fits = (cfg.num_heads * cfg.head_dim) % opts.group_size == 0
    return DEFAULT_PARTS + (("attention",) if opts.gptq and fits else ())


def _is_target(name: str, parts: tuple[str, ...]) -> bool:
    if "vision_model." in name or "multi_modal_projector." in name:
        return False  # vision stays as it is
    if _UNFUSED_EXPERT.search(name):  # a routed expert stored one linear per expert (FP8 release)
        return True
    if "shared" in parts and name.endswith(_SHARED):
        return True
    if "mlp" in parts and name.endswith(_DENSE):
        return True
    return "attention" in parts and name.endswith(_ATTENTION)


@functools.cache
def _glibc():
    """glibc, or None where this is not glibc (the malloc helpers below do nothing there)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; elsewhere a no-op), once
    per shard written: its packed tensors, small and long-lived, were what fragmented the heap
    between the large temporaries (anonymous memory grew by about 9 MB per expert when nothing
    was trimmed). Trimming after every expert instead kept memory flatter but made every
    expert's temporaries fresh pages again, each a fault (and on a VM that reports free pages to
    its host, a fault into the host): `--no-calibrate` on the Scout-width slice 27.6 -> 21-23 s."""
    if _glibc() is not None:
        _glibc().malloc_trim(0)


def keep_freed_memory() -> bool:
    """Make this process keep the memory it frees for its own next allocations (glibc: no mmap
    for large blocks, no trimming of the heap; elsewhere nothing). For quantize, above all a
    calibrated one, which allocates and frees the same large temporaries layer after layer
    (Hessians, their factors, activations: hundreds of MB each). Freed pages otherwise go back
    to the kernel, and touching fresh ones costs the kernel's zeroing, and, in a VM that
    reports free pages to its host (Firecracker's page_reporting here), a fault into the host
    for each as well: on this project's 2-vCPU VM 27% of the slice quantize's CPU time was
    spent zeroing pages; mmap off alone took it from 347 to 287 s wall, peak RSS 15.4 -> 17.4
    GB. Process-wide and for good, so the CLI calls it for `quantize`, where the process ends
    with the run (the shard writer trims once per shard). Returns whether it took."""
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    keep = ctypes.c_int(2**31 - 1)  # mallopt takes a C int: trim only past 2 GB free at the top
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, keep))


def _calibration_windows(src: Path, opts: QuantizeOptions) -> list[list[int]]:
    from llama4_local.tokenizer import Tokenizer

    from .calibrate import calibration_windows

    if not (src / "tokenizer.json").exists():
        raise UserError(f"{src} has no tokenizer.json, which calibration needs; add it or pass --no-calibrate")
    return calibration_windows(Tokenizer(src), opts.calibration_text, opts.calibration_tokens)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not empty; choose a new directory or remove it")


def quantize_checkpoint(
    src: Path,
    out: Path,
    opts: QuantizeOptions,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> QuantizeSummary:
    """Quantize checkpoint `src` into directory `out`; on_progress(done, total, name) in source bytes."""
    src, out = check_model_dir(Path(src)), Path(out).expanduser()
    cfg = load_config(src)
    fp8 = None  # an FP8 source (Maverick's published release): dequantized tensor by tensor
    if cfg.quantization:
        fp8 = QuantScheme.from_config(cfg.quantization, str(src / "config.json"))
        if fp8.kind != "fp8":
            raise UserError(f"{src} is already quantized ({fp8.label}); quantize the original")
    parts = opts.parts if opts.parts is not None else default_parts(cfg, opts)
    bad = [p for p in parts if p not in PARTS]
    if bad or "experts" not in parts:
        got = ", ".join(bad) or parts
        raise UserError(f"--parts takes experts (always), shared, mlp and attention, not {got}")
    if opts.scheme not in ("int4", "nf4"):
        raise UserError(f"--scheme must be int4 or nf4, not {opts.scheme!r}")
    if opts.scheme == "nf4" and not opts.symmetric:
        raise UserError("NF4 has no asymmetric form (its levels are fixed); drop --asymmetric or use --scheme int4")
    if opts.group_size not in GROUP_SIZES:
        raise UserError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, not {opts.group_size}")
    if cfg.hidden_size % opts.group_size or cfg.intermediate_size % opts.group_size:
        raise UserError(
            f"--group-size {opts.group_size} does not divide hidden {cfg.hidden_size} and "
            f"intermediate {cfg.intermediate_size}; pick a smaller group"
        )
    if opts.scheme == "int4" and "attention" in parts and (cfg.num_heads * cfg.head_dim) % opts.group_size:
        raise UserError(
            f"--group-size {opts.group_size} does not divide attention's {cfg.num_heads * cfg.head_dim} "
            "inputs to o_proj; pick a smaller group or --no-attention"
        )
    calibrate = opts.gptq
    if calibrate and opts.calibration_tokens < 16:
        raise UserError(f"--calibration-tokens must be at least 16, not {opts.calibration_tokens}")
    windows = _calibration_windows(src, opts) if calibrate else None  # checked before anything is written
    _check_out(out)
    tensors = list_tensors(src)
    total = sum(p.stat().st_size for p in set(tensors.values()))
    scheme = QuantScheme(opts.group_size, opts.symmetric, kind=opts.scheme)
    device = torch.device(opts.device)

    fingerprint = {
        "source": source_fingerprint(list(tensors.values())),
        "options": [opts.group_size, opts.symmetric, list(parts), opts.shard_bytes, opts.device, opts.scheme],
    }
    eligible = _int8_head(tensors) if opts.scheme == "int4" else None
    head = eligible if opts.int8_lm_head else None  # stored in INT8 in place of the original
    if head:  # (not in the list above: a run from before it resumes as it was)
        fingerprint["lm_head"] = "int8"
    if calibrate:
        fingerprint["calibration"] = [str(opts.calibration_text or "default"), opts.calibration_tokens]
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_old_partials(out)
    work = WorkDir(out, fingerprint)
    start = time.perf_counter()
    work.open()  # refuses (touching nothing) when another run holds it
    try:
        resumed = len(work.shards)
        skip = work.done_units()
        writer = _ShardWriter(work, opts.shard_bytes)
        done, count = 0, 0

        def quantize(w: torch.Tensor, f=None):  # f: GPTQ's error feedback (a matrix, or quant.gptq_lowrank's)
            w = w if f is not None else _contiguous(w)
            if opts.scheme == "nf4":
                from .nf4 import quantize_nf4

                return quantize_nf4(w.to(device), opts.group_size)
            if f is not None:
                qw = gptq_int4(w.to(device), f.to(device), opts.group_size, opts.symmetric, scale_dtype=w.dtype)
            else:
                qw = quantize_int4(w.to(device), opts.group_size, opts.symmetric, scale_dtype=w.dtype)
            qw.packed, qw.scale = qw.packed.cpu(), qw.scale.cpu()
            qw.zero = None if qw.zero is None else qw.zero.cpu()
            return qw

        source = _Fp8Source(tensors, fp8) if fp8 is not None else None
        names = [n for n in tensors if source is None or not source.is_companion(n)]  # FP8 scales go with weights
        handled: set[str] = set()
        if calibrate:
            from .calibrated import calibrated_pass

            def progress(name: str, nbytes: int) -> None:
                nonlocal done
                done += nbytes
                if on_progress:
                    on_progress(done, total, name)

            ctx = SimpleNamespace(
                src=src, opts=opts, windows=windows, fp8_source=source, tensors=tensors, writer=writer,
                skip=skip, quantize=quantize, progress=progress, count=0,
                want_head=bool(eligible and not head), head_feedback=None,
            )  # fmt: skip
            targets = [n for n in names if _is_target(n, parts) or _expert_prefix(n)]
            handled = calibrated_pass(ctx, targets)
            count += ctx.count
        by_shard: dict[Path, list[str]] = {}
        for name in names:
            if name not in handled:
                by_shard.setdefault(tensors[name], []).append(name)
        for path in sorted(by_shard):
            # One source shard mapped at a time: its pages leave our address space when it closes.
            with safe_open(str(path), framework="pt") as f:
                for name in sorted(by_shard[path]):
                    prefix = _expert_prefix(name)
                    if prefix and len(f.get_slice(name).get_shape()) == 3:
                        count += _quantize_experts(f, name, prefix, writer, quantize, skip)
                    elif name in skip:
                        count += _is_target(name, parts)
                    elif _is_target(name, parts):
                        w = source.read(f, name) if source else f.get_tensor(name)
                        writer.add(to_tensors(name.removesuffix(".weight"), quantize(w)), name)
                        count += 1
                        _release_freed_memory()
                    elif name == head:
                        q, scale = q8_blocks(f.get_tensor(name))
                        writer.add({name: q, name.removesuffix("weight") + "weight_scale": scale}, name)
                    elif source is not None and source.is_fp8(name):  # FP8 but not a part asked for: bf16
                        writer.add({name: source.read(f, name)}, name)
                    else:
                        writer.add({name: f.get_tensor(name)}, name)  # a view of the map: the writer parks its bytes
                    done += _nbytes(f, name)
                    if on_progress:
                        on_progress(done, total, name)
        n_shards = writer.finish()

        raw = read_json(src / "config.json")
        raw["quantization_config"] = scheme.config(
            _skip_modules(parts) if opts.scheme == "nf4" else _ignore_list(parts, bool(head)), int8_lm_head=bool(head)
        )
        (work.path / "config.json").write_text(json.dumps(raw, indent=2))
        if eligible and not head:  # the head kept (vLLM serves it), its Q6 or Q8_0 blocks beside it for CPU runs
            feedback = ctx.head_feedback if calibrate else None
            if on_progress:  # GPTQ of Scout's head: about a minute on two cores, after the shards
                on_progress(done, total, eligible)
            with safe_open(str(tensors[eligible]), framework="pt") as f:
                write_head_sidecar(work.path / HEAD_SIDECAR, f.get_tensor(eligible), feedback)
        copied = []
        for p in sorted(src.iterdir()):
            if p.is_file() and p.suffix in COPY_SUFFIXES and p.name not in SKIP_FILES:
                shutil.copy2(p, work.path / p.name)
                copied.append(p.name)
        work.finish()
    except OSError as e:
        _abandon(work)
        if e.errno == errno.ENOSPC:
            kept = f"; the {len(work.shards)} shards finished are kept for the re-run" if work.shards else ""
            raise UserError(
                f"disk full while writing {out}; free space (about {total // 4 >> 30} GiB) and re-run{kept}"
            ) from None
        raise
    except BaseException:
        _abandon(work)
        raise
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return QuantizeSummary(total, out_bytes, time.perf_counter() - start, count, n_shards, copied, resumed)


class _Fp8Source:
    """Reads an FP8 checkpoint's weights as the bf16 tensors they dequantize to (quant/fp8.py):
    what the dequantized bf16 checkpoint holds, so both quantize to the same INT4."""

    def __init__(self, tensors: dict[str, Path], scheme: QuantScheme):
        self.tensors, self.scheme = tensors, scheme
        self._scale_shards: dict[Path, object] = {}  # opened once each: their headers are parsed once

    def is_fp8(self, name: str) -> bool:
        return name.endswith(".weight") and name.removesuffix(".weight") + ".weight_scale" in self.tensors

    def is_companion(self, name: str) -> bool:
        """A scale (or input scale) that belongs to an FP8 weight."""
        return name.endswith(_FP8_COMPANIONS) and name.rsplit(".", 1)[0] + ".weight" in self.tensors

    def read(self, f, name: str) -> torch.Tensor:
        if not self.is_fp8(name):
            return f.get_tensor(name)
        from .fp8 import dequantize_fp8

        scale_name = name.removesuffix(".weight") + ".weight_scale"
        path = self.tensors[scale_name]  # maybe another shard
        if path not in self._scale_shards:
            self._scale_shards[path] = safe_open(str(path), framework="pt")
        scale = self._scale_shards[path].get_tensor(scale_name).clone()  # small; not a view of the map
        return dequantize_fp8(f.get_tensor(name), scale, self.scheme.fp8.block).to(torch.bfloat16)


def _abandon(work: WorkDir) -> None:
    """A run that stops early keeps its finished shards for the next run, or nothing at all."""
    work.release()
    if not work.shards:
        shutil.rmtree(work.path, ignore_errors=True)
        return
    for p in work.path.glob("*.tmp"):
        p.unlink(missing_ok=True)


def _nbytes(f, name: str) -> int:
    sl = f.get_slice(name)
    n = 1
    for d in sl.get_shape():
        n *= d
    return n * _DTYPE_BYTES.get(sl.get_dtype(), 2)


_DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1, "F64": 8, "BOOL": 1, "F8_E4M3": 1}


def _contiguous(w: torch.Tensor) -> torch.Tensor:
    """w [O, N] contiguous. A gate or up slice of a fused expert tensor is a transposed view with
    rows 2I apart, which torch copies element by element; made a whole transposed matrix first,
    it is transposed in blocks: 0.19 -> 0.10 s at Scout's 8192 x 5120 in bf16."""
    if w.dim() == 2 and w.stride(0) == 1 and w.stride(1) > w.shape[0]:
        return w.t().contiguous().t().contiguous()
    return w.contiguous()


def expert_linears(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """One expert's slice of a fused tensor as the linears [out, in] it becomes (views):
    gate_up_proj [D, 2I] -> gate_proj and up_proj [I, D]; down_proj [I, D] -> down_proj [D, I]."""
    if name.endswith("gate_up_proj"):  # gate = first I columns, up = the rest
        inter = t.shape[1] // 2
        return {"gate_proj": t[:, :inter].t(), "up_proj": t[:, inter:].t()}
    return {"down_proj": t.t()}


def expert_weights(model_dir: Path):
    """Every weight the default quantizes, as a contiguous linear [out, in]: each routed expert's
    gate, up and down, and the shared experts (for measuring quantization error)."""
    for name, path in sorted(list_tensors(model_dir).items()):
        if _expert_prefix(name) or name.endswith(_SHARED):
            with safe_open(str(path), framework="pt") as f:
                sl = f.get_slice(name)
                if len(sl.get_shape()) == 3:
                    for e in range(sl.get_shape()[0]):
                        yield from (w.contiguous() for w in expert_linears(name, sl[e]).values())
                else:
                    yield f.get_tensor(name)


def _quantize_experts(f, name: str, prefix: str, writer: _ShardWriter, quantize, skip: set[str]) -> int:
    """Quantize a fused expert tensor one expert at a time (each slice read on its own); experts
    in `skip` are already in finished shards."""
    sl = f.get_slice(name)
    n_exp = sl.get_shape()[0]
    count = 0
    for e in range(n_exp):
        unit = f"{name}#{e}"
        if unit in skip:
            count += 1 if name.endswith("down_proj") else 2
            continue
        # [D, 2I] (gate_up) or [I, D] (down): only this expert's bytes are read
        tensors = {}
        for proj, w in expert_linears(name, sl[e]).items():
            tensors.update(to_tensors(f"{prefix}.{e}.{proj}", quantize(w)))
            count += 1
        writer.add(tensors, unit)
    return count


def _skip_modules(parts: tuple[str, ...]) -> list[str]:
    """Modules left unquantized, as bitsandbytes' llm_int8_skip_modules names them (name parts)."""
    skip = ["lm_head", "router", "vision_model", "multi_modal_projector"]
    if "attention" not in parts:
        skip.append("self_attn")
    if "shared" not in parts:
        skip.append("shared_expert")
    if "mlp" not in parts:
        skip += ["feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj"]
    return skip


# The dense MLP layers (interleaved MoE) in an ignore list.
DENSE_IGNORE = r"re:.*feed_forward\.(gate|up|down)_proj$"


def _int8_head(tensors: dict[str, Path]) -> str | None:
    """The source's lm_head tensor if INT8 blocks of 32 fit it (a bf16/fp16/float32 matrix with
    rows a multiple of 32 long), else None (none: tied embeddings)."""
    name = next((n for n in tensors if n.endswith("lm_head.weight")), None)
    if name is None:
        return None
    with safe_open(str(tensors[name]), framework="pt") as f:
        sl = f.get_slice(name)
        shape, dtype = sl.get_shape(), sl.get_dtype()
    return name if len(shape) == 2 and shape[1] % 32 == 0 and dtype in ("BF16", "F16", "F32") else None


def _ignore_list(parts: tuple[str, ...], int8_head: bool = False) -> list[str]:
    """Linear modules left unquantized, as compressed-tensors names them (re: prefixes)."""
    ignore = [] if int8_head else ["re:.*lm_head"]
    ignore += [
        "re:.*router",
        "re:.*vision_model.*",
        "re:.*multi_modal_projector.*",
    ]
    if "mlp" not in parts:
        ignore.append(DENSE_IGNORE)
    if "attention" not in parts:
        ignore.append("re:.*self_attn.*")
    if "shared" not in parts:
        ignore.append("re:.*shared_expert.*")
    return ignore

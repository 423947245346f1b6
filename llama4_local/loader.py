"""Build a Llama4Text from a checkpoint directory without allocating any weight twice.

The model is constructed on the meta device (no memory), then every parameter is replaced by
the checkpoint tensor: memory-mapped as is when dtype and device already match, otherwise
converted once. Names and shapes are checked against the model and a mismatch names the tensor
and the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .checkpoint import HEAD_SIDECARS, Checkpoint, head_sidecar, open_checkpoint
from .config import TextConfig, load_config
from .errors import UserError
from .model import Llama4Text, rope_inv_freq

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu, cuda or auto, not {device!r}")
    return torch.device(device)


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}") from None


def check_model_dir(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"model path {path} does not exist; pass a local checkpoint directory")
    if not path.is_dir():
        raise UserError(f"model path {path} is a file; pass the checkpoint directory that holds config.json")
    return path


def load_weights(
    model: Llama4Text, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, host: frozenset[str] = frozenset()
) -> None:
    """Assign every parameter of `model` (on meta) from `ckpt`, checking names and shapes; those
    named in `host` stay in host RAM (a mapped view where the dtype matches)."""
    cfg = model.cfg
    if cfg.tie_word_embeddings and "lm_head.weight" not in ckpt:
        ckpt.files["lm_head.weight"] = ckpt.files.get("embed_tokens.weight")
        ckpt.names["lm_head.weight"] = ckpt.names.get("embed_tokens.weight")
    assign_weights(model, ckpt, dtype, device, host)
    model.inv_freq = rope_inv_freq(cfg).to(device)


def assign_weights(
    module: torch.nn.Module,
    ckpt: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    host: frozenset[str] = frozenset(),
) -> None:
    """Replace every parameter of `module` (on meta) by its checkpoint tensor, checking names and shapes.

    Parameters that name the same checkpoint tensor (tied embeddings) share one copy; those named
    in `host` go to the CPU instead of `device`.
    """
    params = {n: p for n, p in module.named_parameters() if p.is_meta}  # those set already (an INT8 lm_head) kept
    missing = [n for n in params if n not in ckpt or ckpt.files[n] is None]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(
            f"checkpoint {ckpt.root} lacks tensor {missing[0]}{more}; is it complete and a Llama 4 checkpoint?"
        )
    for name, p in params.items():
        got = ckpt.shape(name)
        if got != tuple(p.shape):
            raise UserError(
                f"tensor {ckpt.where(name)} has shape {list(got)}, config.json implies {list(p.shape)}; "
                "the checkpoint and its config.json do not match"
            )
    shared: dict[str, torch.Tensor] = {}
    for name in params:
        key = ckpt.where(name)
        t = shared.get(key)
        if t is None:
            t = ckpt.get(name).to(device="cpu" if name in host else device, dtype=dtype)
            shared[key] = t
        module_path, _, attr = name.rpartition(".")
        setattr(module.get_submodule(module_path), attr, torch.nn.Parameter(t, requires_grad=False))


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's mappings of .safetensors files and lm_head sidecars
    (Linux; else none)."""
    out = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith((".safetensors", *HEAD_SIDECARS)):
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            out.append((lo, hi, parts[5]))
    return out


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (Linux); 0 where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _cpu_tensors(model: torch.nn.Module):
    """(module, "_parameters" or "_buffers", name, tensor, mapped) for each non-empty CPU tensor;
    `mapped`: whether it views a mapped shard."""
    maps = [(lo, hi) for lo, hi, _ in file_mappings()]
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in list(getattr(module, kind).items()):
                if t is None or t.device.type != "cpu" or not t.numel():
                    continue
                ptr = t.data_ptr()
                yield module, kind, name, t, any(lo <= ptr < hi for lo, hi in maps)


MOVE_BYTES = 1 << 20


def _own_storage(t: torch.Tensor) -> bool:
    """Whether t is the whole of its storage (moving it elsewhere leaves no other view behind)."""
    nbytes = t.numel() * t.element_size()
    return t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == nbytes


HUGE_PAGE = 2 << 20


def _page_slots(tensors: list[torch.Tensor], huge: bool) -> dict[int, torch.Tensor]:
    """An empty tensor like each of `tensors` (keyed by data pointer), all carved from one
    anonymous mapping, each slot on a 64-byte line (2 MB-aligned start): in transparent huge
    pages with `huge` (madvise MADV_HUGEPAGE), else in 4 KB pages whatever THP_MEM_ALLOC_ENABLE
    (which cli.py sets for quantize's temporaries) or a THP "always" mode would give torch's own
    copies (MADV_NOHUGEPAGE); empty where madvise is missing (the caller clones). Streaming
    weights through 2 MB pages spares a TLB miss every 4 KB (a plain read loop on one Zen 4 core
    22 -> 32 GB/s, the slice's decode 4-10% faster), but on the VMs measured here memory the guest
    has not touched yet costs 1-2 s per GB to fault in as huge pages (0.25 s as 4 KB pages, which
    reuse memory already backed): the slice loaded in 3-8 s instead of 0.5 (docs/benchmarks.md)."""
    import mmap

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return {}
    offsets: dict[int, int] = {}
    total = 0
    for t in tensors:
        if t.data_ptr() not in offsets:
            offsets[t.data_ptr()] = total
            total += -(-t.numel() * t.element_size() // 64) * 64
    if not total:
        return {}
    area = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
    whole = torch.frombuffer(area, dtype=torch.uint8)  # keeps `area` alive as long as a slot lives
    start = -whole.data_ptr() % HUGE_PAGE  # the first slot on a 2 MB boundary
    slots = {}
    for t in tensors:
        ptr = t.data_ptr()
        if ptr in offsets and ptr not in slots:
            lo = start + offsets[ptr]
            raw = whole[lo : lo + t.numel() * t.element_size()]
            slots[ptr] = raw.view(t.dtype).view(t.shape)
    return slots


def copy_mapped_weights(model: torch.nn.Module, budget: float | None = None, small_pages: bool = False) -> int:
    """Replace every CPU parameter and buffer that is a view of a mapped shard by a copy in
    anonymous memory, dropping the mapped pages behind it (llama.cpp's --no-mmap); returns the
    bytes copied. With a `budget`, nothing is copied when the copies would take more. Decode
    reads anonymous memory faster than a mapping of the page cache in 4 KB pages (huge_mapped
    says when the mapping is in 2 MB pages instead). Where the copies go: with
    LLAMA4_LOCAL_HUGE_PAGES=1 to huge pages (_page_slots), and so do the large weights made at
    load in anonymous memory (an INT8 lm_head, INT8 attention), moved there one at a time, each
    old one freed as it goes; else with `small_pages` (the default load) to 4 KB pages, a load
    well under a second; else (--no-mmap) wherever torch's allocator puts them (huge pages under
    the CLI: the fastest decode, after a load of seconds on such VMs)."""
    from .checkpoint import unmap_pages

    huge = _huge_pages_wanted()
    entries, tensors, sizes = [], [], {}
    for module, kind, name, t, mapped in _cpu_tensors(model):
        nbytes = t.numel() * t.element_size()
        if mapped:
            sizes[t.data_ptr()] = nbytes
        elif nbytes < MOVE_BYTES or not _own_storage(t) or not huge:
            continue
        entries.append((module, kind, name, mapped))
        if t.is_contiguous():
            tensors.append(t)
    if budget is not None and sum(sizes.values()) >= budget:
        return 0
    slots = _page_slots(tensors, huge) if huge or small_pages else {}
    tensors = t = None  # from here on only the modules hold the old tensors
    copies: dict[int, torch.Tensor] = {}
    for module, kind, name, mapped in entries:
        old = getattr(module, kind)[name]
        ptr = old.data_ptr()
        c = copies.get(ptr)
        if c is None:
            slot = slots.pop(ptr, None)
            if slot is None and not mapped:
                continue  # no slot for it: an anonymous tensor stays where it is
            c = copies[ptr] = old.detach().clone() if slot is None else slot.copy_(old)
            if mapped:
                unmap_pages(ptr, sizes[ptr])  # the file's pages leave this process (they were only read)
        getattr(module, kind)[name] = torch.nn.Parameter(c, requires_grad=False) if kind == "_parameters" else c
    return sum(sizes[p] for p in copies if p in sizes)


def _huge_pages_wanted() -> bool:
    import os

    return os.environ.get("LLAMA4_LOCAL_HUGE_PAGES") == "1"


def warm_shards(ckpt: Checkpoint, budget: float, with_head: bool = False) -> None:
    """Before anything maps them: read the parts of the shards that the page cache lacks, when the
    shards fit in `budget` (a cold start reads them all anyway; read sequentially they land in
    the large folios that huge_mapped looks for, faulted in through the mapping they would not).
    A shard partly in large folios (so this kernel and filesystem make them) but under
    HUGE_SHARE, as memory pressure leaves it, is dropped and read again: one read of its bytes,
    where the copy that huge_mapped would otherwise lead to faults in fresh memory (on the VM of
    docs/benchmarks.md 6.2-6.9 s for the slice in such a state, 1.8 s to re-read and map). None
    in large folios says nothing (they may never happen here: the copy, as before). A file's
    first ~64 MB stay in small folios even when read through (readahead grows them as it goes)."""
    from . import pages

    paths = sorted({p for p in ckpt.files.values() if p is not None})
    side = head_sidecar(Path(ckpt.root)) if with_head else None
    if side is not None:  # what a bf16 CPU run maps too
        paths.append(side)
    if _huge_pages_wanted() or sum(p.stat().st_size for p in paths) >= budget:
        return
    pages.warm(paths)
    for path in paths:
        if 0 < pages.file_huge_fraction(path) < HUGE_SHARE:
            pages.reread(path)


# The share of the mapped weights' pages that must be mapped 2 MB at a time to keep the mapping.
# Below it (a page cache whose large folios memory pressure has split, measured at 54% after a
# day of other runs: a read loop 22-24 GB/s over it on one core, 31 over a huge-page copy) the
# weights are copied as before: decode is never slower than that default was.
HUGE_SHARE = 0.9


def huge_mapped(model: torch.nn.Module, budget: float) -> bool:
    """Whether the model's mapped weights are best left where they are: the page cache serves
    at least HUGE_SHARE of them in 2 MB mappings (llama4_local/pages.py): a load in well under a
    second, a decode a few percent behind a huge-page copy (whose load is seconds on VMs that
    fault fresh memory in slowly). Not when LLAMA4_LOCAL_HUGE_PAGES=1 asks for copies."""
    from . import pages

    if _huge_pages_wanted():
        return False
    spans = pages.merged(
        [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for *_, t, mapped in _cpu_tensors(model) if mapped]
    )
    if not spans or sum(hi - lo for lo, hi in spans) >= budget:
        return False
    return pages.huge_fraction(spans) >= HUGE_SHARE


def quantized_parts(ckpt: Checkpoint, cfg: TextConfig, scheme):
    """What the checkpoint holds in INT4, for the memory plan (None: nothing)."""
    if scheme is None:
        return None
    from offload.plan import Quantized

    i = cfg.moe_layers.index(True) if True in cfg.moe_layers else 0
    dense = cfg.moe_layers.index(False) if False in cfg.moe_layers else None
    return Quantized(
        group_size=scheme.group_size,
        experts=scheme.marker(f"layers.{i}.feed_forward.experts.0.gate_proj") in ckpt,
        shared=scheme.marker(f"layers.{i}.feed_forward.shared_expert.gate_proj") in ckpt,
        attention=scheme.marker(f"layers.{i}.self_attn.q_proj") in ckpt,
        kind=scheme.kind,
        mlp=dense is not None and scheme.marker(f"layers.{dense}.feed_forward.gate_proj") in ckpt,
    )


def _offload_slots(cfg, ckpt, scheme, torch_dtype, torch_device, opts, context: int, prefill_chunk: int, vcfg=None):
    """(slots, plan): the cache size to build, or None to keep every expert on the device.

    `vcfg`: the vision tower's config when it is loaded too (the plan counts it)."""
    from offload.plan import DEFAULT_MARGIN, plan_memory

    if torch_device.type != "cuda":
        if opts.gpu_memory is not None:
            raise UserError("--gpu-memory plans GPU memory, but the model runs on the CPU; use --expert-cache-slots N")
        return opts.slots, None
    if opts.gpu_memory is not None:
        budget = opts.gpu_memory
    else:
        free, _ = torch.cuda.mem_get_info(torch_device)
        budget = free - DEFAULT_MARGIN
    elt = torch.empty((), dtype=torch_dtype).element_size()
    q = quantized_parts(ckpt, cfg, scheme)
    vision = streamable = 0
    if vcfg is not None:
        from .vision import vision_plan_bytes

        vision, streamable = vision_plan_bytes(vcfg, elt)
    plan = plan_memory(
        cfg,
        budget,
        context,
        elt,
        q,
        prefill_chunk,
        opts.host_memory,
        vision,
        available_memory(),
        streamable,
        _q6_head_bytes(ckpt, cfg, scheme),
    )
    if opts.slots is not None:
        return opts.slots, plan
    return (None if plan.all_resident else plan.slots), plan


def _q6_head_bytes(ckpt: Checkpoint, cfg, scheme) -> int:
    """Bytes of the Q6 lm_head a GPU run reads from the checkpoint's sidecar, or 0."""
    from quant.head import gpu_head_bytes

    return 0 if scheme is None else gpu_head_bytes(ckpt.root, ckpt, cfg.vocab_size, cfg.hidden_size)


def _host_note(manager) -> None:
    """One line on stderr when the machine's available RAM, not --host-memory, bounds the experts
    held in host RAM (offload.setup.build_manager), and fewer than all of them fit; the bound is
    the one the store was sized by (available RAM read again now would lack what it pinned)."""
    store = manager.cache.store
    held, total = len(store.blocks), len(store.keys)
    if manager.host_budget_auto and held < total:
        sys.stderr.write(
            f"note: {held} of {total} experts fit in this machine's available RAM "
            f"({manager.host_budget / 2**30:.1f} GiB of it for them); the others are read from the checkpoint "
            "when chosen (--host-memory sets the RAM experts take)\n"
        )


def text_only(model_dir: Path) -> UserError:
    """The error for images sent to a checkpoint without a vision tower."""
    return UserError(
        f"{model_dir} is a text-only checkpoint (no vision tower); images need a Llama 4 checkpoint "
        "saved as Llama4ForConditionalGeneration with its vision_model weights"
    )


def has_vision(model_dir: Path) -> bool:
    """Whether the checkpoint has a vision tower (config and weights)."""
    from .vision import VisionConfig, vision_checkpoint

    return VisionConfig.from_dir(model_dir) is not None and vision_checkpoint(model_dir) is not None


def load_model(
    model_dir: Path,
    dtype: str = "bfloat16",
    device: str = "auto",
    offload=None,
    context: int | None = None,
    prefill_chunk: int = 512,
    vision: bool = False,
    int8_attention: bool = False,
    mmap: bool | None = True,
) -> tuple[Llama4Text, TextConfig]:
    """Load a checkpoint; with `offload` (offload.setup.OffloadOptions), routed experts go to a cache.

    The manager, when one is built, is `model.offload`, and the memory plan `model.plan`. With
    `vision`, the vision tower is loaded too (`model.vision`) and counted in the plan. With
    `int8_attention`, a bf16/fp16 CPU run rounds the attention projections to INT8 at load
    (quant.kernels.Int8Linear): half the bytes a decode step reads there; a quantized checkpoint's
    bf16/fp16 CPU run does that to its lm_head always (quant.kernels.int8_lm_head). `mmap`: True keeps
    CPU weights as views of the mapped shards (the fastest start, the least memory); False
    copies them into anonymous memory after loading (llama.cpp's --no-mmap: faster decode than
    a mapping in 4 KB pages, docs/benchmarks.md); None keeps the mapping where the page cache
    serves it in 2 MB pages (faster still: huge_mapped), else copies when the copy fits in
    available RAM.
    """
    model_dir = check_model_dir(model_dir)
    cfg = load_config(model_dir)
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    if cfg.quantization and torch_device.type == "cpu" and torch_dtype != torch.float32:
        from quant import cpu_kernel

        cpu_kernel.bf16_gemm_rows()  # LLAMA4_LOCAL_INT4_BF16_GEMM checked now, not mid-prefill
        cpu_kernel.outer_rows()  # LLAMA4_LOCAL_INT4_OUTER too
    ckpt = open_checkpoint(model_dir)
    if mmap is None and torch_device.type == "cpu" and offload is None:
        warm_shards(ckpt, 0.8 * available_memory(), with_head=torch_dtype in (torch.bfloat16, torch.float16))
    model = Llama4Text(cfg)  # on the meta device: allocates nothing
    model.plan = None
    scheme = None
    if cfg.quantization:
        from quant.format import QuantScheme

        scheme = QuantScheme.from_config(cfg.quantization, str(model_dir / "config.json"))
    vcfg = vckpt = None
    if vision:
        from .vision import VisionConfig, vision_checkpoint

        vcfg = VisionConfig.from_dir(model_dir)
        vckpt = vision_checkpoint(model_dir) if vcfg is not None else None
        if vckpt is None:
            raise text_only(model_dir)
    slots = None
    if offload is not None and any(cfg.moe_layers):
        offload.validate()
        ctx = context or min(cfg.max_position_embeddings, 8192)
        slots, model.plan = _offload_slots(
            cfg, ckpt, scheme, torch_dtype, torch_device, offload, ctx, prefill_chunk, vcfg
        )
    if slots is not None:
        from offload.setup import replace_experts

        replace_experts(model)
    if scheme is not None:
        from quant.head import sidecar_lm_head
        from quant.kernels import stored_lm_head
        from quant.modules import apply_quantized

        apply_quantized(model, ckpt, scheme, torch_dtype, torch_device, routed=slots is None)
        if not stored_lm_head(model, ckpt, torch_dtype, torch_device):
            q6_on_device = model.plan is not None and model.plan.head_q6
            sidecar_lm_head(model, ckpt, model_dir, torch_dtype, torch_device, q6_on_device)
    # The plan moves parts to host RAM only where it leaves experts off the device (an expert cache).
    moved = model.plan.host_dense if model.plan is not None else {}
    host = frozenset({"embed_tokens.weight"}) if "embeddings" in moved else frozenset()  # a row a token
    load_weights(model, ckpt, torch_dtype, torch_device, host)
    if slots is not None:
        from offload.setup import attach_offload

        model.offload = attach_offload(model, ckpt, scheme, torch_dtype, torch_device, slots, offload)
        _host_note(model.offload)
    if vcfg is not None:
        from .vision import load_vision

        model.vision = load_vision(vckpt, vcfg, torch_dtype, torch_device, "vision blocks" in moved)
        model.image_token_id = vcfg.image_token_id
    if int8_attention:  # bf16/fp16 CPU weights only; int8_attention checks each one
        from quant.kernels import int8_attention as to_int8

        to_int8(model)
    if scheme is not None:
        from quant.kernels import int8_lm_head

        int8_lm_head(model)  # a bf16/fp16 CPU lm_head stored bf16 only: float32 runs stay exact, GPU ones as they are
    if mmap is not True and torch_device.type == "cpu":
        budget = None if mmap is False else 0.8 * available_memory()  # what loading left
        if mmap is False or not huge_mapped(model, budget):
            copy_mapped_weights(model, budget, small_pages=mmap is None)
    model.eval()
    return model, cfg

"""Reading a Hugging Face Llama 4 checkpoint: safetensors shards, memory-mapped.

This module owns the mapping from checkpoint names to module names (the one place that knows
both): `language_model.model.X` (Llama4ForConditionalGeneration) and `model.X`
(Llama4ForCausalLM) become `X`; `language_model.lm_head.weight` and `lm_head.weight` become
`lm_head.weight`; vision tensors are skipped. Files are opened with safetensors, which maps
them; nothing is unpickled and no code from the checkpoint runs.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import pages
from .config import read_json
from .errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# quantize's blocks of a kept lm_head for CPU runs (quant/head.py): safetensors inside, a name no
# index lists and no *.safetensors glob matches, so vLLM and transformers never load it. Read in
# this order; the second is the name quantize gave it when it wrote Q8_0 only.
HEAD_SIDECAR = "lm_head.llama4-local"
HEAD_SIDECARS = (HEAD_SIDECAR, "lm_head.q8_0.llama4-local")


def head_sidecar(root: Path) -> Path | None:
    """The lm_head sidecar in checkpoint directory `root`, or None."""
    return next((root / n for n in HEAD_SIDECARS if (root / n).is_file()), None)


_PREFIXES = (
    ("language_model.model.", ""),
    ("language_model.lm_head.", "lm_head."),
    ("model.", ""),
    ("lm_head.", "lm_head."),
)
_SKIP = ("vision_model.", "multi_modal_projector.")


def module_name(ckpt_name: str) -> str | None:
    """The module name a checkpoint tensor loads into, or None for tensors text ignores."""
    if ckpt_name.startswith(_SKIP):
        return None
    for prefix, repl in _PREFIXES:
        if ckpt_name.startswith(prefix):
            return repl + ckpt_name[len(prefix) :]
    return None


@dataclass
class Checkpoint:
    """The tensors of one checkpoint, by module name, each with the shard it lives in."""

    root: Path
    files: dict[str, Path]  # module name -> shard
    names: dict[str, str]  # module name -> checkpoint name

    def __post_init__(self):
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, dict[str, tuple[int, int]]] = {}
        self._fds: dict[Path, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _open(self, path: Path):
        h = self._handles.get(path)
        if h is None:
            h = open_shard(path)
            self._handles[path] = h
        return h

    def shape(self, name: str) -> tuple[int, ...]:
        path = self.files[name]
        return tuple(self._open(path).get_slice(self.names[name]).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped from its shard (no copy until it is converted or moved)."""
        path = self.files[name]
        try:
            return self._open(path).get_tensor(self.names[name])
        except SafetensorError as e:
            raise UserError(f"cannot read tensor {self.names[name]} from {path}: {e}; re-download the shard") from None

    def where(self, name: str) -> str:
        return f"{self.names[name]} in {self.files[name]}"

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        """(shard, offset, length) of the tensor's bytes in its file."""
        path = self.files[name]
        offsets = self._headers.get(path)
        if offsets is None:
            offsets = self._headers[path] = tensor_offsets(path)
        start, end = offsets[self.names[name]]
        return path, start, end - start

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def prefetch_pages(self, names: list[str]) -> None:
        """Start reading these tensors' bytes into the page cache without waiting (pages.read_ahead:
        the kernel reads them while we compute)."""
        for name in names:
            pages.read_ahead(*self.byte_range(name))

    def drop_pages(self, names: list[str]) -> int:
        """Drop these tensors' pages from this process's mapping (madvise DONTNEED) and then from
        the page cache (posix_fadvise DONTNEED; the kernel keeps pages that are still mapped), so
        they are read again from disk when next used; returns the bytes advised. Where either
        call is missing (not Linux), nothing happens."""
        if not hasattr(os, "posix_fadvise") or _madvise() is None:
            return 0
        total = 0
        for name in names:
            t = self.get(name)  # a view of the shard's mapping: reads nothing
            unmap_pages(t.data_ptr(), t.numel() * t.element_size())
            path, off, length = self.byte_range(name)
            os.posix_fadvise(self._fd(path), off, length, os.POSIX_FADV_DONTNEED)
            total += length
        return total


META = "__metadata__"
MADV_DONTNEED = 4  # Linux


@functools.cache
def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return fn


def unmap_pages(ptr: int, length: int) -> None:
    """madvise(DONTNEED) the whole pages inside [ptr, ptr + length) of a read-only file mapping:
    they are read from the file again on the next access."""
    page = mmap.PAGESIZE
    start, end = -(-ptr // page) * page, (ptr + length) // page * page
    if end > start:
        _madvise()(start, end - start, MADV_DONTNEED)


def tensor_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's [start, end) byte offsets in a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items() if k != META}


def open_shard(path: Path):
    if not path.is_file():
        raise UserError(f"shard {path} is missing; re-download the checkpoint")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); re-download it") from None


_LISTINGS: dict[tuple, dict[str, Path]] = {}  # the last few listings, by the files' identities


def _stamp(model_dir: Path) -> tuple:
    """What identifies a listing: the directory and each safetensors file's size and mtime."""
    files = []
    for p in sorted(model_dir.glob("*.safetensors*")):
        st = p.stat()
        files.append((p.name, st.st_size, st.st_mtime_ns))
    return (str(model_dir.resolve()), tuple(files))


def list_tensors(model_dir: Path) -> dict[str, Path]:
    """Every tensor of the checkpoint in `model_dir` (sharded or single-file): name -> shard.

    Listed once per state of the files: `chat` asks whether a vision tower exists, then loads
    the text model and the tower; each shard header is read once."""
    model_dir = Path(model_dir)
    key = _stamp(model_dir)
    if key not in _LISTINGS:
        if len(_LISTINGS) >= 4:
            _LISTINGS.pop(next(iter(_LISTINGS)))
        _LISTINGS[key] = _list_tensors(model_dir)
    return dict(_LISTINGS[key])


def _list_tensors(model_dir: Path) -> dict[str, Path]:
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise UserError(f"{index_path} has no weight_map; re-download the checkpoint")
        for shard in weight_map.values():
            if not plain_file_name(shard):
                raise UserError(
                    f"{index_path} names shard {shard!r}, which is not a file in the checkpoint directory; "
                    "the index is damaged or hostile: re-download the checkpoint"
                )
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise UserError(f"{index_path} names shard {shard}, which is missing; re-download the checkpoint")
        names = {}
        for shard in shards:
            # Read each shard's own header: a truncated or foreign shard is caught here, and
            # the index cannot send us to a tensor the shard does not hold.
            keys = set(open_shard(model_dir / shard).keys())
            for name, in_shard in weight_map.items():
                if in_shard == shard:
                    if name not in keys:
                        raise UserError(f"{index_path} places {name} in {shard}, which does not hold it")
                    names[name] = model_dir / shard
        return names
    if (model_dir / SINGLE_NAME).is_file():
        path = model_dir / SINGLE_NAME
        return {k: path for k in open_shard(path).keys()}
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    hint = f" (found {', '.join(found[:3])} without {INDEX_NAME})" if found else ""
    raise UserError(f"{model_dir} has no {SINGLE_NAME} or {INDEX_NAME}{hint}; is it a complete checkpoint?")


def open_checkpoint(model_dir: Path) -> Checkpoint:
    """Index every text tensor of the checkpoint in `model_dir` by module name."""
    files, names = {}, {}
    for ckpt_name, path in list_tensors(model_dir).items():
        mod = module_name(ckpt_name)
        if mod is not None:
            files[mod] = path
            names[mod] = ckpt_name
    return Checkpoint(root=Path(model_dir), files=files, names=names)


def plain_file_name(name) -> bool:
    """A shard name is a file name in the checkpoint's directory: no path, no parent, no drive."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and ":" not in name
    )

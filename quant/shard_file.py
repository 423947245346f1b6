"""Output shards written past the page cache: the same bytes `safetensors.torch.save_file` writes,
streamed through one aligned buffer with O_DIRECT where the OS and filesystem allow it.

A buffered write puts every byte into fresh page-cache pages first. On this project's 2-vCPU
VM each fresh page also faults into the host (free pages are reported to it), and writing
1.5 GB took 10.3 s of kernel time, where the same bytes with O_DIRECT took 0.64 s (dd, 8 MB
blocks); for the Scout-width slice that was 7.7 s of a 210 s calibrated quantize. Scout's 60 GB
of output would otherwise also push the source checkpoint out of the page cache. The SHA-256
that the resume manifest records is computed from the bytes as they go out, so the shard is
not read back.

The layout is safetensors' own (tests check it byte for byte against `safetensors.torch.save`
and read it back with `safe_open`): an 8-byte little-endian header length, the JSON header
(padded with spaces to 8 bytes), then the tensors by dtype (widest first, as the library orders
them, so every tensor is aligned to its element size) and by name. A dtype outside the table
below goes through save_file itself.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from .resume import file_sha256

# safetensors' dtype names, in the library's order (its Dtype enum); it writes the last first
_ORDER = (
    (torch.bool, "BOOL"),
    (torch.uint8, "U8"),
    (torch.int8, "I8"),
    (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"),
    (torch.int16, "I16"),
    (torch.uint16, "U16"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.int32, "I32"),
    (torch.uint32, "U32"),
    (torch.float32, "F32"),
    (torch.float64, "F64"),
    (torch.int64, "I64"),
    (torch.uint64, "U64"),
)
_RANK = {dt: (i, name) for i, (dt, name) in enumerate(_ORDER)}
CHUNK = 8 << 20  # the staging buffer: a multiple of any block size O_DIRECT asks for
_ALIGN = 4096
_staging: mmap.mmap | None = None  # one per process, faulted in once


def header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """The file's first bytes (length and JSON header, padded) and the tensors' order."""
    order = sorted(tensors, key=lambda n: (-_RANK[tensors[n].dtype][0], n))
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = metadata
    offset = 0
    for n in order:
        t = tensors[n]
        size = t.numel() * t.element_size()
        entries[n] = {"dtype": _RANK[t.dtype][1], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def write_shard(
    path: Path, tensors: dict[str, torch.Tensor | Spilled], metadata: dict[str, str] | None = None
) -> tuple[int, str]:
    """Write `tensors` (contiguous, CPU, or parked in a Spill) to path as safetensors; returns
    (bytes, SHA-256 hex)."""
    if any(not isinstance(t, Spilled) and (t.dtype not in _RANK or t.device.type != "cpu") for t in tensors.values()):
        tensors = {n: t.spill.tensor(t) if isinstance(t, Spilled) else t for n, t in tensors.items()}
        save_file(tensors, str(path), metadata=metadata)
        return path.stat().st_size, file_sha256(path)
    head, order = header(tensors, metadata)
    with _DirectFile(path) as out:
        out.write(memoryview(head))
        for n in order:
            t = tensors[n]
            if isinstance(t, Spilled):
                for chunk in t.spill.read(t):
                    out.write(chunk)
            elif t.numel():
                out.write(_bytes(t))
        return out.size, out.sha.hexdigest()


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


class Spilled:
    """A tensor parked in a Spill: what the header needs, and where its bytes are."""

    def __init__(self, spill: Spill, dtype: torch.dtype, shape: tuple[int, ...], offset: int, nbytes: int):
        self.spill, self.dtype, self.shape, self.offset, self.nbytes = spill, dtype, shape, offset, nbytes

    def numel(self) -> int:
        return self.nbytes // self.element_size()

    def element_size(self) -> int:
        return self.dtype.itemsize


class Spill:
    """Tensors parked in a file until their shard is written (O_DIRECT both ways where allowed),
    so that a shard's output does not wait in memory: each waiting byte was a fresh page (on this
    project's VM a fault into the host), and a calibrated quantize held up to a shard (2 GB) of
    them. Each tensor starts on a 4 KB boundary; `reset` empties the file for the next shard."""

    def __init__(self, path: Path):
        self.path = path
        self.buf = mmap.mmap(-1, CHUNK)  # its own: write_shard's buffer is in use while this is read
        self.out: _DirectFile | None = None  # while tensors are parked
        self._fd: int | None = None  # while they are read back

    def put(self, t: torch.Tensor) -> Spilled | torch.Tensor:
        """Park t (returns its record), or keep t as it is where its dtype is not safetensors'."""
        if t.dtype not in _RANK or t.device.type != "cpu" or not t.numel():
            return t
        if self.out is None:
            self.out = _DirectFile(self.path, self.buf, hashed=False)
        self.out.write(memoryview(bytes(-self.out.size % _ALIGN)))  # start on a block
        offset = self.out.size
        self.out.write(_bytes(t))
        return Spilled(self, t.dtype, tuple(t.shape), offset, self.out.size - offset)

    def read(self, t: Spilled):
        """t's bytes, in pieces of at most CHUNK (views of one buffer: use each before the next)."""
        if self.out is not None:  # everything parked goes to the file before any is read
            self.out.close()
            self.out = None
            self._fd = _open_read(self.path)
        done = 0
        while done < t.nbytes:
            start = t.offset + done
            aligned = start - start % _ALIGN
            want = min(CHUNK, -(-(t.offset + t.nbytes - aligned) // _ALIGN) * _ALIGN)
            got = os.preadv(self._fd, [memoryview(self.buf)[:want]], aligned)
            k = min(got - (start - aligned), t.nbytes - done)
            if k <= 0:
                raise OSError(errno.EIO, f"{self.path} ended early")
            yield memoryview(self.buf)[start - aligned : start - aligned + k]
            done += k

    def tensor(self, t: Spilled) -> torch.Tensor:
        """t back in memory."""
        out = torch.empty(t.nbytes, dtype=torch.uint8)
        done = 0
        for chunk in self.read(t):
            out[done : done + len(chunk)] = torch.frombuffer(chunk, dtype=torch.uint8)
            done += len(chunk)
        return out.view(t.dtype).view(t.shape)

    def reset(self) -> None:
        """Empty the file (after its shard is written)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_read(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        return os.open(path, os.O_RDONLY)


class _DirectFile:
    """Sequential writes of any length, gathered in an aligned buffer and written in whole
    buffers with O_DIRECT (plainly where that is refused); the tail padded, then truncated."""

    def __init__(self, path: Path, buf: mmap.mmap | None = None, hashed: bool = True):
        global _staging
        if buf is None:
            if _staging is None:
                _staging = mmap.mmap(-1, CHUNK)
            buf = _staging
        self.buf, self.pos, self.size = buf, 0, 0
        self.sha = hashlib.sha256() if hashed else None
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        self.direct = hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError:  # tmpfs and some others refuse O_DIRECT
            self.direct = False
            self.fd = os.open(path, flags, 0o644)

    def __enter__(self) -> _DirectFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close(exc[0] is None)

    def close(self, complete: bool = True) -> None:
        """Write what is left (unless `complete` is False) and close."""
        try:
            if complete and self.pos:
                tail = -self.pos % _ALIGN if self.direct else 0
                self.buf[self.pos : self.pos + tail] = bytes(tail)
                self._flush(self.pos + tail)
                if tail:
                    os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)

    def write(self, data: memoryview) -> None:
        if self.sha is not None:
            self.sha.update(data)
        self.size += len(data)
        while len(data):
            k = min(len(data), CHUNK - self.pos)
            self.buf[self.pos : self.pos + k] = data[:k]
            self.pos += k
            data = data[k:]
            if self.pos == CHUNK:
                self._flush(CHUNK)

    def _flush(self, n: int) -> None:
        view = memoryview(self.buf)[:n]
        try:
            done = 0
            while done < n:
                done += os.write(self.fd, view[done:])
        except OSError as e:
            if not self.direct or e.errno != errno.EINVAL:
                raise
            self._plain()  # the device asked for a larger alignment than ours: write plainly
            while done < n:
                done += os.write(self.fd, view[done:])
        finally:
            view.release()
        self.pos = 0

    def _plain(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

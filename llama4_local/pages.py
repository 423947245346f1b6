"""How the page cache serves a mapped checkpoint, and reading it so that 2 MB pages can (Linux).

Linux 6.16+ keeps ext4 files (XFS and others earlier) in large page-cache folios, up to 2 MB,
when they are written or read sequentially; a read-only mapping of such a file is then mapped 2
MB at a time (FilePmdMapped in /proc/self/smaps), as a transparent huge page would be, with no
copy and nothing to fault in afresh. Streaming weights through those mappings is faster than
through 4 KB pages (one TLB entry per 2 MB): on the 2-vCPU Zen 4 VM of docs/benchmarks.md a
plain read loop made 33 GB/s over such a mapping, 29 over the same file in 4 KB folios and 31
over an anonymous copy, and the slice decoded 5-20% faster than from the copy. Files faulted in
page by page through a mapping (a cold start that maps first) land in 4 KB folios; reading them
sequentially first gives the large ones.

Everything here answers "no" (or does nothing) where /proc or mincore is missing.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from pathlib import Path

HUGE = 2 << 20
READ_CHUNK = 16 << 20


def merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Address ranges [lo, hi) sorted, overlapping and touching ones joined."""
    out: list[list[int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


@functools.cache
def _mincore():
    try:
        fn = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    return fn


def resident_fraction(lo: int, hi: int) -> float | None:
    """The share of the pages of [lo, hi) (inside one mapping) that the page cache holds, by
    mincore(2); None where it cannot say."""
    fn = _mincore()
    page = mmap.PAGESIZE
    start, end = lo // page * page, -(-hi // page) * page
    if fn is None or end <= start:
        return None
    vec = ctypes.create_string_buffer((end - start) // page)
    if fn(start, end - start, vec) != 0:
        return None
    import numpy as np

    return float((np.frombuffer(vec.raw, dtype=np.uint8) & 1).mean())


def file_resident_fraction(path: Path) -> float | None:
    """The share of a file's pages in the page cache (mincore over a mapping that touches none)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0 or _mincore() is None:
                return None
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                import numpy as np

                base = np.frombuffer(m, dtype=np.uint8).ctypes.data
                try:
                    return resident_fraction(base, base + size)
                finally:
                    del base
    except (OSError, ValueError, BufferError):
        return None


def warm(paths: list[Path]) -> int:
    """Read through each file the page cache holds less than half of, before anything maps it
    (pages faulted in through a mapping land in 4 KB folios); returns the bytes read."""
    total = 0
    for path in paths:
        share = file_resident_fraction(path)
        if share is not None and share < 0.5:
            total += read_through(path)
    return total


def read_through(path: Path) -> int:
    """Read a file once from start to end with plain reads (the kernel's sequential readahead puts
    it in large folios where it can); returns the bytes read."""
    buf = bytearray(READ_CHUNK)
    view, total = memoryview(buf), 0
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(view):
            total += n
    return total


def touch(spans: list[tuple[int, int]]) -> None:
    """Read one byte in every 2 MB of each span, so the mapping holds the pages behind it (one
    2 MB mapping each where the page cache has a 2 MB folio there)."""
    for lo, hi in spans:
        addr = lo
        while addr < hi:
            ctypes.string_at(addr, 1)
            addr = (addr // HUGE + 1) * HUGE


def smaps_totals(text: str, spans: list[tuple[int, int]]) -> tuple[int, int]:
    """(Rss, FilePmdMapped) in bytes over the mappings of a /proc/<pid>/smaps text that overlap
    any of `spans`."""
    rss = pmd = 0
    inside = False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = any(lo < b and a < hi for a, b in spans)
        elif inside and head in ("Rss:", "FilePmdMapped:"):
            kb = int(line.split()[1]) * 1024
            if head == "Rss:":
                rss += kb
            else:
                pmd += kb
    return rss, pmd


def huge_fraction(spans: list[tuple[int, int]]) -> float:
    """The share of the resident pages of the mappings holding `spans` that are mapped 2 MB at a
    time, after touching every 2 MB of the spans; 0.0 where /proc/self/smaps cannot say."""
    touch(spans)
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0.0
    rss, pmd = smaps_totals(text, spans)
    return pmd / rss if rss else 0.0

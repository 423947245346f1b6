"""How the page cache serves a mapped checkpoint, and reading it so that 2 MB pages can (Linux).

Linux 6.16+ keeps ext4 files (XFS and others earlier) in large page-cache folios, up to 2 MB,
when they are written or read sequentially; a read-only mapping of such a file is then mapped 2
MB at a time (FilePmdMapped in /proc/self/smaps), as a transparent huge page would be, with no
copy and nothing to fault in afresh. Streaming weights through those mappings is faster than
through 4 KB pages (one TLB entry per 2 MB): on the 2-vCPU Zen 4 VM of docs/benchmarks.md a
plain read loop made 33 GB/s over such a mapping, 29 over the same file in 4 KB folios, 31 over
an anonymous copy in 4 KB pages and 34 over one in huge pages; the slice decoded 5-12% faster
than from the 4 KB copy and 4-9% slower than from the huge-page one, whose load took 3-8 s there
(0.07-0.09 s mapped). Files faulted in
page by page through a mapping (a cold start that maps first, or pages evicted and faulted back)
land in 4 KB folios; reading what is missing sequentially first gives the large ones.

Everything here answers "no" (or does nothing) where /proc or mincore is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import queue
import threading
from pathlib import Path

HUGE = 2 << 20
READ_CHUNK = 16 << 20
WILLNEED_CHUNK = 8 << 20  # bytes per posix_fadvise(WILLNEED) call (ReadAhead)


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


def residency(lo: int, hi: int):
    """Per page of [lo, hi) (inside one mapping): whether the page cache holds it (numpy uint8,
    1 or 0, by mincore(2)); None where it cannot say."""
    fn = _mincore()
    page = mmap.PAGESIZE
    start, end = lo // page * page, -(-hi // page) * page
    if fn is None or end <= start:
        return None
    vec = ctypes.create_string_buffer((end - start) // page)
    if fn(start, end - start, vec) != 0:
        return None
    import numpy as np

    return np.frombuffer(vec.raw, dtype=np.uint8) & 1


@contextlib.contextmanager
def _file_mapping(path: Path):
    """(start address, size) of a read-only mapping of a whole file that touches none of it;
    (0, 0) for an empty file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            yield 0, 0
            return
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            import numpy as np

            yield np.frombuffer(m, dtype=np.uint8).ctypes.data, size


def file_residency(path: Path):
    """residency() over a whole file, through a mapping that touches none of it."""
    try:
        with _file_mapping(path) as (base, size):
            return residency(base, base + size) if size else None
    except (OSError, ValueError, BufferError):
        return None


def file_huge_fraction(path: Path) -> float:
    """huge_fraction() over a whole file, mapped for the purpose (it touches every 2 MB of it)."""
    with _file_mapping(path) as (base, size):
        return huge_fraction([(base, base + size)]) if size else 0.0


def file_resident_fraction(path: Path) -> float | None:
    """The share of a file's pages in the page cache; None where it cannot say."""
    vec = file_residency(path)
    return None if vec is None else float(vec.mean())


def missing_runs(vec, page: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the file ranges holding pages that `vec` (file_residency) says are
    absent, each widened to whole 2 MB (the folios reading makes), joined, within `size`."""
    import numpy as np

    absent = np.flatnonzero(vec == 0)
    if not absent.size:
        return []
    breaks = np.flatnonzero(np.diff(absent) > 1)
    firsts = np.concatenate(([absent[0]], absent[breaks + 1]))
    lasts = np.concatenate((absent[breaks], [absent[-1]]))
    spans = [
        (int(a) * page // HUGE * HUGE, min(size, -(-(int(b) + 1) * page // HUGE) * HUGE))
        for a, b in zip(firsts, lasts, strict=True)
    ]
    return [(lo, hi - lo) for lo, hi in merged(spans)]


def warm(paths: list[Path]) -> int:
    """Before anything maps them: read the parts of each file that the page cache lacks with plain
    reads (pages faulted in through a mapping land in 4 KB folios, read ones in large folios where
    the kernel makes them); returns the bytes read."""
    total = 0
    for path in paths:
        vec = file_residency(path)
        if vec is not None:
            for off, length in missing_runs(vec, mmap.PAGESIZE, Path(path).stat().st_size):
                total += read_range(path, off, length)
    return total


def read_range(path: Path, offset: int, length: int) -> int:
    """Read [offset, offset + length) of a file once with plain sequential reads; returns the
    bytes read."""
    buf = bytearray(min(READ_CHUNK, max(length, 1)))
    view, total = memoryview(buf), 0
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), offset, length, os.POSIX_FADV_SEQUENTIAL)
        f.seek(offset)
        while total < length and (n := f.readinto(view[: min(len(view), length - total)])):
            total += n
    return total


class ReadAhead:
    """Byte ranges of files read into the page cache in the background: posix_fadvise(WILLNEED)
    WILLNEED_CHUNK bytes at a time on one daemon thread, so the caller returns at once.

    One WILLNEED call reads at most the device's largest request (Linux clamps it to
    max(io_pages, ra_pages): 8 MB on this project's VM, often 128 KB to 1 MB on NVMe), and a call
    returns only once its reads are queued. Asked for a 4.4 GB shard in one call, the kernel read
    8 MB of it; in 8 MB calls, all of it, the calls taking 2.3 s (3.2 GB/s disk): hence chunks, off
    the caller's thread. Nothing happens where posix_fadvise is missing; a file that cannot be
    opened is skipped (reading it later says what is wrong)."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, path: Path, offset: int, length: int) -> None:
        if not hasattr(os, "posix_fadvise") or length <= 0:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llama4-read-ahead", daemon=True)
                self._thread.start()
        self._queue.put((Path(path), offset, length))

    def drain(self) -> None:
        """Wait until every range added so far has been asked of the kernel."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            path, offset, length = self._queue.get()
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    for off in range(offset, offset + length, WILLNEED_CHUNK):
                        n = min(WILLNEED_CHUNK, offset + length - off)
                        os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
            except OSError:
                pass
            finally:
                self._queue.task_done()


_read_ahead = ReadAhead()


def _after_fork() -> None:  # a forked child has no read-ahead thread: it starts its own
    global _read_ahead
    _read_ahead = ReadAhead()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def read_ahead(path: Path, offset: int, length: int) -> None:
    """Start reading [offset, offset + length) of a file into the page cache; returns at once."""
    _read_ahead.add(path, offset, length)


def read_ahead_drain() -> None:
    """Wait for every read_ahead so far to be asked of the kernel (tests, benchmarks)."""
    _read_ahead.drain()


def read_through(path: Path) -> int:
    """Read a whole file once with plain reads; returns the bytes read."""
    return read_range(path, 0, Path(path).stat().st_size)


def reread(path: Path) -> int:
    """Drop a file's pages from the page cache (those no process maps) and read it through again,
    so that it comes back in large folios where memory pressure had split them; returns the
    bytes read. A disk read of the file: on the 2-vCPU VM of docs/benchmarks.md 1.7 s for 1.37 GB,
    against 6.9 s for copying its split pages into fresh anonymous memory there."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return read_through(path)


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


def regions(spans: list[tuple[int, int]]) -> int:
    """How many 2 MB-aligned regions of the address space the spans (merged) overlap."""
    marks = set()
    for lo, hi in spans:
        marks.update(range(lo // HUGE, (hi - 1) // HUGE + 1))
    return len(marks)


def huge_fraction(spans: list[tuple[int, int]]) -> float:
    """The share of the 2 MB regions that `spans` overlap which the mappings holding them map 2
    MB at a time, after touching each region (a region in 4 KB folios maps only the pages around
    the touch, so Rss alone would overstate the share); 0.0 where /proc/self/smaps cannot say."""
    spans = merged(spans)
    touch(spans)
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0.0
    _, pmd = smaps_totals(text, spans)
    n = regions(spans)
    return min(1.0, pmd / (n * HUGE)) if n else 0.0

"""The default CPU load keeps a checkpoint mapped where the page cache serves it in 2 MB pages,
copies it otherwise, and reads a cold checkpoint through before mapping it (llama4_local/pages.py)."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

from llama4_local import loader, pages
from llama4_local.checkpoint import HEAD_SIDECAR
from llama4_local.loader import file_mappings, load_model
from quant import cpu_kernel
from quant.kernels import AVX2_PATHS, Int4Linear

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page cache calls are Linux's")


def test_regions_count_the_2mb_regions_the_spans_overlap():
    huge = pages.HUGE
    assert pages.regions([(0, 1)]) == 1
    assert pages.regions([(huge - 1, huge + 1)]) == 2
    assert pages.regions([(0, 3 * huge), (huge, huge + 5)]) == 3
    assert pages.regions([]) == 0


def test_merged_joins_overlapping_and_touching_spans():
    assert pages.merged([(10, 20), (0, 5), (5, 8), (15, 30), (40, 41)]) == [(0, 8), (10, 30), (40, 41)]
    assert pages.merged([]) == []


SMAPS = """\
7f0000000000-7f0000400000 r--s 00000000 fd:00 12 /m/model-00001.safetensors
Size:               4096 kB
Rss:                4096 kB
FilePmdMapped:      2048 kB
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
Rss:                2048 kB
FilePmdMapped:         0 kB
7f0001000000-7f0001200000 r--s 00000000 fd:00 13 /m/model-00002.safetensors
Rss:                 512 kB
FilePmdMapped:         0 kB
"""


def test_smaps_totals_count_only_the_mappings_that_hold_the_spans():
    one = [(0x7F0000001000, 0x7F0000002000)]
    assert pages.smaps_totals(SMAPS, one) == (4096 * 1024, 2048 * 1024)
    both = one + [(0x7F00011FF000, 0x7F0001200000)]
    assert pages.smaps_totals(SMAPS, both) == (4608 * 1024, 2048 * 1024)
    assert pages.smaps_totals(SMAPS, [(0x10, 0x20)]) == (0, 0)


def test_missing_runs_cover_the_absent_pages_in_whole_2mb():
    import numpy as np

    page, huge = 4096, pages.HUGE
    vec = np.ones(4 * huge // page, dtype=np.uint8)
    assert pages.missing_runs(vec, page, 4 * huge) == []
    vec[5] = 0  # one page in the first 2 MB
    vec[huge // page + 1 : huge // page + 3] = 0  # two in the second: one run with the first
    vec[-1] = 0  # the last page (the third 2 MB is all there), the file ending 100 bytes into it
    size = 4 * huge - page + 100
    assert pages.missing_runs(vec, page, size) == [(0, 2 * huge), (3 * huge, size - 3 * huge)]


@linux
def test_residency_follows_the_page_cache(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(6 << 20))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    cold = pages.file_resident_fraction(path)
    if cold is None or cold > 0.5:
        pytest.skip("this filesystem keeps its pages (tmpfs) or mincore is missing")
    assert pages.warm([path]) == 6 << 20  # everything missing: read once
    assert pages.file_resident_fraction(path) > 0.9
    assert pages.warm([path]) == 0  # now cached: nothing read
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 2 << 20, 2 << 20, os.POSIX_FADV_DONTNEED)  # evict the middle 2 MB
    if pages.file_resident_fraction(path) > 0.8:
        pytest.skip("the page cache kept the evicted range")
    assert pages.warm([path]) == 2 << 20  # only the missing 2 MB


def _mapped(model, int4_only: bool = False) -> list[bool]:
    """For each weight (each INT4 linear's packed weights only): whether it views a mapped shard."""
    maps = [(lo, hi) for lo, hi, _ in file_mappings()]
    if int4_only:
        weights = [m.packed for m in model.modules() if isinstance(m, Int4Linear)]
    else:
        weights = [t for t in list(model.parameters()) + list(model.buffers()) if t.numel() > 4096]
    return [any(lo <= t.data_ptr() < hi for lo, hi in maps) for t in weights]


@pytest.mark.parametrize("huge", [1.0, 0.0])
def test_default_load_keeps_the_mapping_only_where_it_is_in_huge_pages(scout_int4, monkeypatch, huge):
    path, _ = scout_int4
    if load_model(path, "bfloat16", "cpu")[0].layers[0].feed_forward.shared_expert.gate_proj.path not in AVX2_PATHS:
        pytest.skip("our AVX2 kernel is not available here (other paths repack the weights)")
    seen = []
    monkeypatch.setattr(pages, "huge_fraction", lambda spans: seen.append(spans) or huge)
    auto, _ = load_model(path, "bfloat16", "cpu", mmap=None)
    assert seen and all(lo < hi for lo, hi in seen[0])
    assert all(_mapped(auto, int4_only=True)) if huge else not any(_mapped(auto))
    copied, _ = load_model(path, "bfloat16", "cpu", mmap=False)  # --no-mmap copies whatever the pages
    assert not any(_mapped(copied))
    ids = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(1))
    a = auto(ids, auto.new_cache(9), last_only=False)
    assert torch.equal(a, copied(ids, copied.new_cache(9), last_only=False))


def test_the_default_copies_into_4kb_pages_whatever_torch_would_use(scout_int4, monkeypatch):
    """The default's fallback copy must load fast: 4 KB pages (MADV_NOHUGEPAGE), not the huge
    pages torch gives clones under THP_MEM_ALLOC_ENABLE=1 (3-8 s to fault in on some VMs)."""
    import mmap

    from tests.test_mapped_weights import _vm_flags

    if not hasattr(mmap, "MADV_NOHUGEPAGE"):
        pytest.skip("no transparent huge pages on this platform")
    path, _ = scout_int4
    monkeypatch.setattr(pages, "huge_fraction", lambda spans: 0.0)
    model, _ = load_model(path, "bfloat16", "cpu", mmap=None)
    linears = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if linears[0].path not in AVX2_PATHS:
        pytest.skip("our AVX2 kernel is not available here")
    assert not any(_mapped(model))
    for lin in linears:
        assert "nh" in _vm_flags(lin.packed.data_ptr()), "the default's copies may land in huge pages"
    copied, _ = load_model(path, "bfloat16", "cpu", mmap=False)  # --no-mmap: torch's allocator decides
    assert "nh" not in _vm_flags(next(m for m in copied.modules() if isinstance(m, Int4Linear)).packed.data_ptr())


def test_huge_pages_asked_for_means_copies(scout_int4, monkeypatch):
    path, _ = scout_int4
    monkeypatch.setenv("LLAMA4_LOCAL_HUGE_PAGES", "1")
    monkeypatch.setattr(pages, "huge_fraction", lambda spans: 1.0)
    model, _ = load_model(path, "bfloat16", "cpu", mmap=None)
    assert not any(_mapped(model))


def test_a_cold_checkpoint_is_read_before_it_is_mapped(scout_int4, monkeypatch):
    import numpy as np

    path, _ = scout_int4
    order = []
    cold = lambda p: np.zeros(-(-p.stat().st_size // 4096), dtype=np.uint8)  # noqa: E731
    monkeypatch.setattr(pages, "file_residency", cold)
    monkeypatch.setattr(pages, "read_range", lambda p, off, n: order.append(("read", p, off, n)) or n)
    real = loader.Llama4Text
    monkeypatch.setattr(loader, "Llama4Text", lambda cfg: order.append(("build",)) or real(cfg))
    load_model(path, "bfloat16", "cpu", mmap=None)
    shards = sorted(path.glob("*.safetensors")) + [path / HEAD_SIDECAR]  # the lm_head's INT8 blocks too
    reads = [o for o in order if o[0] == "read"]
    assert [(o[1], o[2], o[3]) for o in reads] == [(s, 0, s.stat().st_size) for s in shards]
    assert order.index(reads[-1]) < order.index(("build",))
    order.clear()
    load_model(path, "bfloat16", "cpu", mmap=True)  # --mmap: the fastest start, nothing read ahead
    assert not [o for o in order if o[0] == "read"]
    monkeypatch.setattr(pages, "file_residency", lambda p: np.ones(-(-p.stat().st_size // 4096), dtype=np.uint8))
    order.clear()
    load_model(path, "bfloat16", "cpu", mmap=None)  # already cached: nothing read
    assert not [o for o in order if o[0] == "read"]


def test_a_checkpoint_larger_than_the_budget_is_neither_read_nor_copied(scout_int4, monkeypatch):
    path, _ = scout_int4
    reads = []
    monkeypatch.setattr(loader, "available_memory", lambda: 1000)
    monkeypatch.setattr(pages, "read_range", lambda p, off, n: reads.append(p) or n)
    model, _ = load_model(path, "bfloat16", "cpu", mmap=None)
    assert not reads
    if cpu_kernel.available():  # (without our kernel torch's INT4 path repacks the weights)
        assert any(_mapped(model))


@pytest.mark.parametrize(("share", "reread"), [(0.0, False), (0.3, True), (0.95, False)])
def test_a_split_page_cache_is_read_again(scout_int4, monkeypatch, share, reread):
    """A shard partly in 2 MB folios but under HUGE_SHARE (memory pressure split them) is dropped
    and read again before mapping; none in them (a kernel or filesystem without large folios)
    or enough of them: left alone."""
    path, _ = scout_int4
    done = []
    monkeypatch.setattr(pages, "file_huge_fraction", lambda p: share)
    monkeypatch.setattr(pages, "reread", lambda p: done.append(p) or 0)
    load_model(path, "bfloat16", "cpu", mmap=None)
    assert done == (sorted(path.glob("*.safetensors")) + [path / HEAD_SIDECAR] if reread else [])
    done.clear()
    load_model(path, "bfloat16", "cpu", mmap=True)  # --mmap: nothing read ahead
    assert not done


def test_reread_reads_the_file_through(tmp_path):
    f = tmp_path / "shard"
    f.write_bytes(os.urandom(3 << 20))
    assert pages.reread(f) == 3 << 20
    if pages.file_resident_fraction(f) is not None:
        assert pages.file_resident_fraction(f) == 1.0


@linux
def test_read_ahead_asks_for_every_byte_in_chunks_off_the_callers_thread(tmp_path, monkeypatch):
    """One WILLNEED call reads at most the device's largest request, so a range goes in chunks, on
    the read-ahead thread (the caller returns before they are asked)."""
    import threading

    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * 100)
    calls, gate = [], threading.Event()

    def fadvise(fd, offset, length, advice):
        gate.wait(5)
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice, threading.current_thread().name))

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    chunk = pages.WILLNEED_CHUNK
    pages.read_ahead(path, 3, 2 * chunk + 5)
    pages.read_ahead(path, 0, 0)  # nothing to read
    assert calls == []  # the caller did not wait
    gate.set()
    pages.read_ahead_drain()
    assert [c[1:3] for c in calls] == [(3, chunk), (3 + chunk, chunk), (3 + 2 * chunk, 5)]
    assert {(c[0], c[3]) for c in calls} == {(str(path), os.POSIX_FADV_WILLNEED)}
    assert all(c[4] != threading.current_thread().name for c in calls)


@linux
def test_read_ahead_fills_the_page_cache(tmp_path):
    """A range dropped from the page cache is back in it after read_ahead (where the filesystem
    drops clean pages at all: not tmpfs)."""
    path = tmp_path / "cold.bin"
    size = 48 << 20
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    cold = pages.file_resident_fraction(path)
    if cold is None or cold > 0.2:
        pytest.skip("this filesystem keeps the file's pages (tmpfs) or mincore is missing")
    pages.read_ahead(path, 0, size)
    pages.read_ahead_drain()  # every read asked for; the last ones may still be in flight
    deadline = time.monotonic() + 10
    while pages.file_resident_fraction(path) < 0.95 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pages.file_resident_fraction(path) > 0.95

"""An INT4 checkpoint loads without copying its weights: the kernel reads the mapped files."""

from __future__ import annotations

import pytest

from llama4_local.loader import file_mappings, load_model
from quant.kernels import Int4Linear


def test_int4_weights_are_views_of_the_checkpoint_files(scout_int4):
    path, _ = scout_int4
    model, _ = load_model(path, "bfloat16", "cpu")
    linears = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert linears
    if linears[0].path not in ("avx2", "avx2_q8"):
        pytest.skip("our AVX2 kernel is not available here")
    maps = [(lo, hi) for lo, hi, p in file_mappings() if str(path) in p]
    for lin in linears:
        for t in (lin.packed, lin.scales_and_zeros):  # bf16 symmetric scales: read as stored too
            ptr = t.data_ptr()
            assert any(lo <= ptr < hi for lo, hi in maps), "weights copied out of the mapped shard"


def test_no_mmap_copies_and_computes_the_same(scout_int4):
    import torch

    path, _ = scout_int4
    mapped, _ = load_model(path, "bfloat16", "cpu")
    copied, _ = load_model(path, "bfloat16", "cpu", mmap=False)
    maps = [(lo, hi) for lo, hi, p in file_mappings() if str(path) in p]
    tensors = [t for t in list(copied.parameters()) + list(copied.buffers()) if t.numel()]
    assert not any(lo <= t.data_ptr() < hi for t in tensors for lo, hi in maps)  # nothing left mapped
    ids = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(0))
    a = mapped(ids, mapped.new_cache(10), last_only=False)
    b = copied(ids, copied.new_cache(10), last_only=False)
    assert torch.equal(a, b)
    # And the mapped model still reads its (re-faulted) pages correctly after the other dropped them.
    assert torch.equal(mapped(ids, mapped.new_cache(10), last_only=False), a)


def _vm_flags(ptr: int) -> list[str] | None:
    """The VmFlags of the mapping of this process that holds `ptr` (Linux's /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return None


def test_copies_ask_for_huge_pages(scout_int4, monkeypatch):
    import mmap

    from llama4_local import loader

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no transparent huge pages on this platform")
    path, _ = scout_int4
    monkeypatch.setenv("LLAMA4_LOCAL_HUGE_PAGES", "1")
    monkeypatch.setattr(loader, "MOVE_BYTES", 1)  # the test model's INT8 lm_head is small
    copied, _ = load_model(path, "bfloat16", "cpu", mmap=False)
    linears = [m for m in copied.modules() if isinstance(m, Int4Linear)]
    if linears[0].path not in ("avx2", "avx2_q8"):
        pytest.skip("our AVX2 kernel is not available here")
    for lin in linears:
        assert "hg" in _vm_flags(lin.packed.data_ptr()), "copied weights not advised for huge pages"
        assert lin.packed.data_ptr() % 64 == 0
    # The INT8 lm_head made at load (anonymous memory) is moved there too.
    assert "hg" in _vm_flags(copied.lm_head.qweight.data_ptr())

"""quant/shard_file.py: output shards written past the page cache, byte for byte what
safetensors writes."""

import errno
import hashlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from quant import shard_file
from quant.shard_file import _ORDER, write_shard


def _tensors(big: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ts = {f"m.{i}.w": torch.randint(0, 100, (i * 997 + 3, 5), generator=g).to(dt) for i, (dt, _) in enumerate(_ORDER)}
    ts["a.empty"] = torch.zeros(0, 4)
    ts["z.scale"] = torch.randn(7, 3).bfloat16()
    if big:
        ts["big"] = torch.randn(big).float()  # spans several staging buffers
    return ts


@pytest.mark.parametrize("meta", [None, {"format": "pt"}])
def test_bytes_match_safetensors(tmp_path, meta):
    ts = _tensors(big=5 * shard_file.CHUNK // 4 // 2 + 123)
    size, sha = write_shard(tmp_path / "a.safetensors", ts, meta)
    ref = save(ts, metadata=meta)
    assert (tmp_path / "a.safetensors").read_bytes() == ref
    assert (size, sha) == (len(ref), hashlib.sha256(ref).hexdigest())
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        for name, t in ts.items():
            assert torch.equal(f.get_tensor(name), t)


def test_lengths_around_the_buffer(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_file, "CHUNK", 8192)
    monkeypatch.setattr(shard_file, "_staging", None)
    for n in (1, *range(8192 - 80, 8192 - 64), 8192, 3 * 8192 + 5):  # the header: 72 bytes
        ts = {"x": torch.arange(n, dtype=torch.uint8)}
        size, sha = write_shard(tmp_path / "x.safetensors", ts)
        ref = save(ts)
        assert (tmp_path / "x.safetensors").read_bytes() == ref and size == len(ref), n
    monkeypatch.setattr(shard_file, "_staging", None)  # not one 8 KB buffer for later tests


def test_without_o_direct(tmp_path, monkeypatch):
    """A filesystem that refuses O_DIRECT at open, or at the first write (EINVAL): plain writes."""
    ts = _tensors()
    ref = save(ts)
    real_open, real_write = shard_file.os.open, shard_file.os.write

    def refusing_open(path, flags, *a):
        if flags & getattr(shard_file.os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(shard_file.os, "open", refusing_open)
    assert write_shard(tmp_path / "a.safetensors", ts)[0] == len(ref)
    assert (tmp_path / "a.safetensors").read_bytes() == ref
    monkeypatch.setattr(shard_file.os, "open", real_open)

    calls = []

    def refusing_write(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(shard_file.os, "write", refusing_write)
    assert write_shard(tmp_path / "b.safetensors", ts)[0] == len(ref)
    assert (tmp_path / "b.safetensors").read_bytes() == ref and len(calls) >= 2


def test_disk_full_raises(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard_file.os, "write", full)
    with pytest.raises(OSError) as e:
        write_shard(tmp_path / "a.safetensors", _tensors())
    assert e.value.errno == errno.ENOSPC


def test_other_dtypes_go_through_save_file(tmp_path):
    ts = {"c": torch.zeros(3, dtype=torch.complex64), "x": torch.ones(2)}
    size, sha = write_shard(tmp_path / "a.safetensors", ts)
    data = (tmp_path / "a.safetensors").read_bytes()
    assert size == len(data) and sha == hashlib.sha256(data).hexdigest()
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("c"), ts["c"])


def test_parked_tensors_write_the_same_shard(tmp_path, monkeypatch):
    """Tensors parked in a Spill (each on a 4 KB boundary, read back in buffer-sized pieces) give
    the bytes safetensors writes for them in memory; an odd dtype among them sends the shard
    through save_file with the parked ones read back; reset removes the file."""
    from quant.shard_file import Spill, Spilled

    monkeypatch.setattr(shard_file, "CHUNK", 8192)
    monkeypatch.setattr(shard_file, "_staging", None)
    ts = _tensors(big=3 * 8192 // 4 + 7)
    spill = Spill(tmp_path / "p.spill.tmp")
    parked = {n: spill.put(t.contiguous()) for n, t in ts.items()}
    assert isinstance(parked["big"], Spilled) and not isinstance(parked["a.empty"], Spilled)
    size, sha = write_shard(tmp_path / "a.safetensors", parked, {"format": "pt"})
    ref = save(ts, metadata={"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == ref and sha == hashlib.sha256(ref).hexdigest()
    spill.reset()
    assert not (tmp_path / "p.spill.tmp").exists()

    odd = {"c": torch.ones(6, dtype=torch.complex64), "x": torch.arange(5000, dtype=torch.int32)}
    parked = {n: spill.put(t) for n, t in odd.items()}
    assert isinstance(parked["x"], Spilled) and not isinstance(parked["c"], Spilled)
    write_shard(tmp_path / "b.safetensors", parked)
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(n), t) for n, t in odd.items())
    spill.reset()
    monkeypatch.setattr(shard_file, "_staging", None)

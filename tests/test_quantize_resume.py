"""`quantize` resumes a killed run from the output shards it finished and verified."""

from __future__ import annotations

import fcntl
import json
import os

import pytest
from safetensors.torch import load_file

import quant.quantize as qmod
from llama4_local.errors import UserError
from quant.quantize import QuantizeOptions, quantize_checkpoint

OPTS = QuantizeOptions(group_size=64, shard_bytes=100_000)


class Counting:
    """Counts the quantizer's fits (GPTQ's and the plain one's together) and raises
    KeyboardInterrupt on call `stop`; `install` puts it in place of both."""

    def __init__(self, stop: int | None = None):
        self.calls, self.stop = 0, stop

    def wrap(self, real):
        def fit(*a, **k):
            self.calls += 1
            if self.calls == self.stop:
                raise KeyboardInterrupt
            return real(*a, **k)

        return fit

    def install(self, monkeypatch):
        for name in ("quantize_int4", "gptq_int4"):
            monkeypatch.setattr(qmod, name, self.wrap(getattr(qmod, name)))
        return self


def contents(out):
    tensors = {}
    for p in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(p))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return tensors, index


def same(a, b):
    (ta, ia), (tb, ib) = contents(a), contents(b)
    return ia == ib and ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


@pytest.fixture(scope="module")
def reference(scout_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    summary = quantize_checkpoint(scout_ckpt, out, OPTS)
    return out, summary


def interrupted(scout_ckpt, out, monkeypatch, stop, opts=OPTS):
    Counting(stop).install(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(scout_ckpt, out, opts)
    work = out.parent / f".{out.name}.partial"
    manifest = json.loads((work / "progress.json").read_text())
    assert not out.exists() and manifest["shards"] and not list(work.glob("*.tmp"))
    return work, manifest


def test_resume_redoes_only_the_unfinished_part(tmp_path, scout_ckpt, monkeypatch, reference):
    ref, summary = reference
    out = tmp_path / "out"
    work, manifest = interrupted(scout_ckpt, out, monkeypatch, stop=40)
    counter = Counting().install(monkeypatch)
    again = quantize_checkpoint(scout_ckpt, out, OPTS)
    assert again.resumed_shards == len(manifest["shards"]) > 0
    assert 0 < counter.calls < summary.quantized_linears  # the finished shards were not quantized again
    assert again.quantized_linears == summary.quantized_linears
    assert same(out, ref) and not work.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())


def test_a_damaged_shard_and_those_after_it_are_redone(tmp_path, scout_ckpt, monkeypatch, reference):
    out = tmp_path / "out"
    work, manifest = interrupted(scout_ckpt, out, monkeypatch, stop=60)
    assert len(manifest["shards"]) >= 2
    victim = work / manifest["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    victim.write_bytes(bytes(data))
    Counting().install(monkeypatch)
    again = quantize_checkpoint(scout_ckpt, out, OPTS)
    assert again.resumed_shards == 1
    assert same(out, reference[0])


def test_other_options_start_over(tmp_path, scout_ckpt, monkeypatch):
    out = tmp_path / "out"
    interrupted(scout_ckpt, out, monkeypatch, stop=40)
    counter = Counting().install(monkeypatch)
    other = QuantizeOptions(group_size=32, shard_bytes=100_000)
    again = quantize_checkpoint(scout_ckpt, out, other)
    assert again.resumed_shards == 0 and counter.calls == again.quantized_linears
    fresh = tmp_path / "fresh"
    quantize_checkpoint(scout_ckpt, fresh, other)
    assert same(out, fresh)


def test_leftovers_of_dead_runs_go_and_a_live_run_is_not_disturbed(tmp_path, scout_ckpt):
    out = tmp_path / "out"
    old = tmp_path / ".out.partial-999999999"  # the old naming; no such process
    old.mkdir()
    (old / "shard-00000.safetensors").write_bytes(b"junk")
    mine = tmp_path / f".out.partial-{os.getpid()}"  # a run that is still alive: left alone
    mine.mkdir()
    work = tmp_path / ".out.partial"
    work.mkdir()
    with open(work / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another quantize run is writing"):
            quantize_checkpoint(scout_ckpt, out, OPTS)
    assert not old.exists() and mine.exists()
    (work / "junk.bin").write_bytes(b"x")  # unknown files in an unlocked work dir are cleared
    quantize_checkpoint(scout_ckpt, out, OPTS)
    assert out.is_dir() and not work.exists() and not (out / "junk.bin").exists()

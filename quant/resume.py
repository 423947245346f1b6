"""Where a quantize run writes, so that a killed run can be resumed rather than started over.

A run writes into `.OUT.partial` beside OUT and renames it to OUT when everything is written.
While it runs it holds a lock on the directory (a second run for the same OUT is refused), and
after each output shard is complete on disk it records the shard in `progress.json`: its file,
size, SHA-256 and the source units (a tensor, or one expert of a fused tensor) whose outputs it
holds. A re-run with the same source and options takes the shards that are still there and
whose bytes still hash the same, and quantizes only the rest; anything else the dead run left
(a half-written shard, shards of other options) is removed. Directories left by older versions
(`.OUT.partial-PID`, one per run) are removed once their process is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from llama4_local.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two runs on one OUT are the user's to avoid
    fcntl = None

MANIFEST = "progress.json"
LOCK = ".lock"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def source_fingerprint(files: list[Path]) -> dict:
    """What identifies the source: each file's name, size and modification time."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(set(files))}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_old_partials(out: Path) -> list[Path]:
    """`.OUT.partial-PID` directories (the old naming) whose run is gone; returns those removed."""
    removed = []
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if p.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def work_path(out: Path) -> Path:
    """Where a run writing OUT works: `.OUT.partial` beside it."""
    return out.parent / f".{out.name}.partial"


class WorkDir:
    """The hidden directory one run owns; `shards` lists the finished ones a resumed run keeps."""

    def __init__(self, out: Path, fingerprint: dict):
        self.out = out
        self.path = work_path(out)
        self.fingerprint = fingerprint
        self.shards: list[dict] = []
        self._lock = None

    def open(self) -> None:
        """Create or take over the directory; `shards` becomes the finished ones that verify."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        manifest = self._read_manifest()
        kept: list[dict] = []
        if manifest is not None and manifest.get("fingerprint") == self.fingerprint:
            for shard in manifest.get("shards", []):
                if not self._intact(shard):
                    break  # shards are written in order: a missing or changed one ends what is kept
                kept.append(shard)
        keep = {s["file"] for s in kept} | {LOCK}
        for p in self.path.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.shards = kept
        self._write_manifest()

    def done_units(self) -> set[str]:
        return {u for s in self.shards for u in s["units"]}

    def add_shard(
        self, tmp: Path, name: str, units: list[str], tensors: list[str], tensor_bytes: int, written: tuple[int, str]
    ) -> None:
        """Record a shard written to `tmp` (in this directory) as finished under `name`; `written`:
        its size and SHA-256, as its writer computed them on the way out."""
        final = self.path / name
        os.replace(tmp, final)
        size, sha = written
        self.shards.append(
            {"file": name, "bytes": size, "sha256": sha, "units": units,
             "tensors": tensors, "tensor_bytes": tensor_bytes}
        )  # fmt: skip
        self._write_manifest()

    def finish(self) -> None:
        """Everything is written: drop the bookkeeping and rename the directory to OUT."""
        (self.path / MANIFEST).unlink(missing_ok=True)
        self.release()
        (self.path / LOCK).unlink(missing_ok=True)
        if self.out.exists():
            self.out.rmdir()  # empty: checked before the run
        self.path.rename(self.out)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- internals --------------------------------------------------------------------------------
    def _take_lock(self) -> None:
        if fcntl is None:
            return
        f = open(self.path / LOCK, "a+")  # noqa: SIM115 (held open while the run lasts)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise UserError(
                f"another quantize run is writing {self.out} (its work is in {self.path}); wait for it or stop it"
            ) from None
        self._lock = f

    def _read_manifest(self) -> dict | None:
        try:
            data = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _write_manifest(self) -> None:
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "shards": self.shards}, indent=1))
        os.replace(tmp, self.path / MANIFEST)

    def _intact(self, shard: dict) -> bool:
        p = self.path / str(shard.get("file", ""))
        try:
            return p.is_file() and p.stat().st_size == shard["bytes"] and file_sha256(p) == shard["sha256"]
        except (OSError, KeyError):
            return False

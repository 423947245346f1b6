"""Routing traces: which experts each token chose in each MoE layer.

File format (CSV, one row per token and layer, in the order the runner computed them):

    token,layer,experts
    0,0,5
    0,1,12
    ...

`token` is the position in the sequence, `experts` the chosen expert ids separated by spaces
(top-k order). Rows of one forward pass come layer by layer, all its tokens per layer, which is
the order a cache sees them; `accesses` turns a trace into that access sequence so policies can
be replayed offline against Belady's optimum (offload.policy).

"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llama4_local.errors import UserError

HEADER = "token,layer,experts\n"


def check_trace_path(path: Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"--record-routing {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"--record-routing: directory {path.parent} does not exist; create it first")
    return path


class RoutingRecorder:
    """Observer for every MoE layer of a model; writes to a temporary name, renamed on close."""

    def __init__(self, path: Path, model):
        self.path = check_trace_path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.file = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.file.write(HEADER)
        self.moe_layers = [i for i, layer in enumerate(model.layers) if layer.is_moe]
        self.next = 0  # position of the next new token
        self.base = 0
        self.model = model
        for i in self.moe_layers:
            model.layers[i].feed_forward.observer = self

    def __call__(self, layer: int, idx: torch.Tensor) -> None:
        if layer == self.moe_layers[0]:  # a new forward pass: its tokens follow the previous ones
            self.base = self.next
            self.next += idx.shape[0]
        rows = idx.tolist()
        self.file.writelines(
            f"{self.base + t},{layer},{' '.join(map(str, experts))}\n" for t, experts in enumerate(rows)
        )

    def close(self) -> None:
        for i in self.moe_layers:
            self.model.layers[i].feed_forward.observer = None
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def read_trace(path: Path) -> list[tuple[int, int, tuple[int, ...]]]:
    """Rows (token, layer, experts) of a trace file."""
    rows = []
    with open(path, encoding="utf-8") as f:
        if f.readline() != HEADER:
            raise UserError(f"{path} is not a routing trace (expected the header {HEADER.strip()!r})")
        for n, line in enumerate(f, start=2):
            try:
                tok, layer, experts = line.rstrip("\n").split(",")
                rows.append((int(tok), int(layer), tuple(int(e) for e in experts.split())))
            except ValueError:
                raise UserError(f"{path}:{n}: malformed trace row {line.strip()!r}") from None
    return rows


def access_groups(rows) -> list[list[tuple[int, int]]]:
    """Per forward pass and layer, the (layer, expert) keys the layer ran, in the order the
    runner's MoE hands them to the cache: top-k order for one token, expert id order for many.

    A new group starts where the layer changes (or the token position goes back); consecutive
    forwards of a model with a single MoE layer are therefore merged.
    """
    groups: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int, tuple[int, ...]]] = []

    def flush():
        if not cur:
            return
        layer = cur[0][1]
        if len(cur) == 1:
            keys = list(dict.fromkeys((layer, e) for e in cur[0][2]))
        else:
            keys = sorted({(layer, e) for r in cur for e in r[2]})
        groups.append(keys)
        cur.clear()

    for row in rows:
        if cur and (row[1] != cur[-1][1] or row[0] < cur[-1][0]):
            flush()
        cur.append(row)
    flush()
    return groups


def accesses(rows) -> list[tuple[int, int]]:
    """The (layer, expert) sequence a cache serves, flattened from `access_groups`."""
    return [k for g in access_groups(rows) for k in g]

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


def accesses(rows) -> list[tuple[int, int]]:
    """The (layer, expert) sequence a cache serves: per run of rows of one layer, each distinct
    expert once, in first-use order (a layer runs each chosen expert once per forward)."""
    out: list[tuple[int, int]] = []
    group: dict[tuple[int, int], None] = {}
    prev = None
    for tok, layer, experts in rows:
        if prev is not None and (layer != prev[1] or tok < prev[0]):
            out.extend(group)
            group = {}
        for e in experts:
            group[(layer, e)] = None
        prev = (tok, layer)
    out.extend(group)
    return out

"""Write quant/data/calibration.txt, the default GPTQ calibration text (quant/calibrate.py).

Documentation prose from CPython's standard library docstrings, the training split of
benchmarks/train_small.py (one module in 20 is held out there for the KL benchmarks' eval.txt,
and none of those modules is used here), shuffled with seed 0, about 160 kB.

    python benchmarks/make_calibration_text.py
"""

from __future__ import annotations

import random
from pathlib import Path

from train_small import docstrings

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 160_000


def main():
    train, _ = docstrings()
    docs = train.split("\n\n")
    random.Random(0).shuffle(docs)
    out, size = [], 0
    for d in docs:
        if size + len(d) > LIMIT:
            break
        out.append(d)
        size += len(d) + 2
    path = ROOT / "quant" / "data" / "calibration.txt"
    path.write_text("\n\n".join(out) + "\n", encoding="utf-8")
    print(f"{path}: {len(out)} docstrings, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()

"""The Scout-width slice (benchmarks/scout_slice.py) in the layout of Meta's FP8 release.

Routed experts one linear per expert, they and the shared experts as FP8 weights with one bf16
scale per row, made by compressed-tensors' own compressor (as tests/fp8_util.py does for the
small test checkpoints); attention, routers, norms, embeddings and lm_head stay bf16. Written
one source shard (one layer) at a time.

    python benchmarks/fp8_slice.py SRC OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama4_local.checkpoint import INDEX_NAME  # noqa: E402
from quant.quantize import expert_linears  # noqa: E402
from tests.fp8_util import SHARED, compress_fp8, fp8_scheme, quantization_config  # noqa: E402


def convert_shard(src: Path, scheme) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(src), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                base = name.rsplit(".", 1)[0]
                for e in range(t.shape[0]):
                    for proj, w in expert_linears(name, t[e]).items():
                        c, _ = compress_fp8(w.contiguous().to(torch.bfloat16), scheme)
                        out[f"{base}.{e}.{proj}.weight"] = c["weight"]
                        out[f"{base}.{e}.{proj}.weight_scale"] = c["weight_scale"]
            elif name.endswith(SHARED):
                c, _ = compress_fp8(t.to(torch.bfloat16), scheme)
                out[name] = c["weight"]
                out[name.removesuffix(".weight") + ".weight_scale"] = c["weight_scale"]
            else:
                out[name] = t
    return {k: v.contiguous() for k, v in out.items()}


def write_fp8_slice(src: Path, out: Path) -> Path:
    scheme = fp8_scheme("channel", None)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors = convert_shard(shard, scheme)
        save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
        print(f"{shard.name}: {len(tensors)} tensors", file=sys.stderr, flush=True)
    (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = quantization_config(scheme)
    (tmp / "config.json").write_text(json.dumps(raw, indent=1))
    for p in src.iterdir():
        if p.suffix == ".json" and p.name not in ("config.json", INDEX_NAME):
            shutil.copy2(p, tmp / p.name)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    write_fp8_slice(args.src, args.out)


if __name__ == "__main__":
    main()

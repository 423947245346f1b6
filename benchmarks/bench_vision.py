"""Scout's vision tower: seconds per image tile, and what the image preprocessing costs.

Builds the vision tower and projector at Scout's real sizes (from the fixture config.json: 34
blocks of width 1408, 0.87 B parameters) with random weights in memory, then times:
  - preprocessing (decode not included) of a 1-tile and a 16-tile (+ global view) image,
  - the tower on 1 tile and on a pass of `--tiles` tiles, in each dtype asked for,
and reports seconds per tile, tiles/s and achieved TFLOP/s (the matmuls' 2 x params x tokens).
`--streamed N`: also a N-tile image (17: 16 tiles and the global view) with the tower whole on
the device and with its blocks in host RAM, copied into one block's room as they run (what a
run beside an expert cache does), one after the other.

    python benchmarks/bench_vision.py [--device cpu|cuda] [--dtypes bfloat16,float32] [--tiles 4] [--streamed 17]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import best_time  # noqa: E402

from llama4_local.images import ImageSettings, prepare  # noqa: E402
from llama4_local.vision import Vision, VisionConfig, rope_2d, vision_parameters  # noqa: E402

CONFIG = ROOT / "tests" / "data" / "scout-instruct-config.json"  # Scout's real config


def random_tower(cfg: VisionConfig, dtype: torch.dtype, device: torch.device) -> Vision:
    v = Vision(cfg)
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, p in list(v.named_parameters()):
        fan_in = p.shape[-1]
        t = torch.randn(p.shape, generator=g) * (fan_in**-0.5 if p.dim() > 1 else 0.02)
        if "layernorm" in name and name.endswith("weight"):
            t = t + 1.0
        mod, _, attr = name.rpartition(".")
        setattr(v.get_submodule(mod), attr, torch.nn.Parameter(t.to(device, dtype), requires_grad=False))
    cos, sin = rope_2d(cfg)
    v.rope_cos, v.rope_sin = cos.to(device), sin.to(device)
    return v.eval()


def streamed_against_whole(tower: Vision, cfg: VisionConfig, dtype, device, args, g) -> dict:
    """An image of args.streamed tiles through the whole tower, then with its blocks in host RAM
    (pageable, as a mapped checkpoint's are) copied into one block's room as they run."""
    pixels = torch.randn(args.streamed, 3, cfg.image_size, cfg.image_size, generator=g).to(device, dtype)
    whole = best_time(lambda: tower(pixels), device, args.reps)
    want = tower(pixels)
    for block in tower.vision_model.model.layers:
        block.to("cpu")
    tower.make_room(dtype, device)
    streamed = best_time(lambda: tower(pixels), device, args.reps)
    blocks = sum(p.nbytes for p in tower.vision_model.model.layers.parameters())
    row = {
        "dtype": str(dtype).removeprefix("torch."),
        "tiles": args.streamed,
        "whole_s": round(whole, 3),
        "streamed_s": round(streamed, 3),
        "blocks_GB": round(blocks / 1e9, 3),
        "copy_GB_s": round(blocks / (streamed - whole) / 1e9, 1) if streamed > whole else None,
        "equal": bool(torch.equal(tower(pixels), want)),
    }
    if not args.json:
        print(f"{row['dtype']:9s} {args.streamed} tiles whole {whole:.3f} s, streamed {streamed:.3f} s")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--tiles", type=int, default=4, help="tiles per pass for the batched timing")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--streamed", type=int, default=0, help="tiles of an image timed streamed and whole (0: not)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = VisionConfig.from_hf(json.loads(CONFIG.read_text()), str(CONFIG))
    params = vision_parameters(cfg)
    tokens = cfg.patches_per_side**2 + 1
    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "parameters": params,
        "tokens_per_tile": cfg.tokens_per_tile,
    }

    from PIL import Image

    g = torch.Generator().manual_seed(1)
    settings = ImageSettings()
    pre = {}
    for label, (h, w) in {"1_tile_336x336": (336, 336), "16_tiles_1344x1344": (1344, 1344)}.items():
        px = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
        img = Image.frombytes("RGB", (w, h), px.numpy().tobytes())
        t0 = time.perf_counter()
        prepared = prepare(img, settings)
        pre[label] = {"tiles": prepared.tiles, "seconds": round(time.perf_counter() - t0, 4)}
    out["preprocess"] = pre

    runs = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        tower = random_tower(cfg, dtype, device)
        for n in (1, args.tiles):
            pixels = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g).to(device, dtype)
            s = best_time(lambda: tower(pixels, tiles_per_pass=n), device, args.reps)
            flops = 2 * (params - cfg.vision_output_dim * cfg.text_hidden_size) * tokens * n
            runs.append(
                {
                    "dtype": name,
                    "tiles": n,
                    "seconds": round(s, 3),
                    "seconds_per_tile": round(s / n, 3),
                    "tflops": round(flops / s / 1e12, 3),
                }
            )
            if not args.json:
                print(f"{name:9s} {n:2d} tile(s): {s:7.3f} s, {s / n:6.3f} s/tile, {flops / s / 1e12:.3f} TFLOP/s")
        if args.streamed:
            out.setdefault("streamed", []).append(streamed_against_whole(tower, cfg, dtype, device, args, g))
        tower = None  # free it before the next dtype
    out["runs"] = runs
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

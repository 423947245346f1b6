"""This runner against llama.cpp on the CPU, side by side: one machine, one run, same threads.

Builds (once, cached under benchmarks/.cache/) llama.cpp's CPU tools from the llama-cpp-python
sdist, a Scout-width slice checkpoint (benchmarks/scout_slice.py: Scout's layer widths, 4
layers, 4 experts top-1, vocab 600, 2.77 B parameters), its F16 GGUF (llama.cpp's converter),
Q4_0 and Q4_K_M (llama-quantize), Q4_K_M with an importance matrix (llama-imatrix over the
calibration text our default uses, the peer of our calibrated quantize) and our default INT4
checkpoint (`llama4-local quantize`), timing each quantize. Then, for each thread count, it
alternates the sides `--reps` times: `llama-bench -p 128 -n 32` on Q4_0, Q4_K_M and F16, and
the same work in this runner (a 128-token prefill from an empty cache, 32 single-token decode
steps; each run in a fresh process, as llama-bench runs, unless --in-process) on INT4 (as
`prompt` runs it: with the default checkpoint attention is INT4; one with bf16 attention gets
it rounded to INT8 at load) and bf16, and reports the best of each: tok/s,
the ratio to llama.cpp Q4_0 (INT4) or F16 (bf16), and the bytes
of weights a decode token reads with the GB/s that makes.

    python benchmarks/bench_vs_llamacpp.py [--threads 1,2] [--reps 3] [--json FILE] [--depth N]
    python benchmarks/bench_vs_llamacpp.py --quantize [--reps 2] [--avx2]   # quantize times, alternated
    python benchmarks/bench_vs_llamacpp.py --experts 16 --vocab 202048   # Scout's MoE and head

Needs cmake, a C++ compiler and the test extras (transformers, for llama.cpp's converter).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as cli.py runs every command (set before torch allocates)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import llamacpp  # noqa: E402
from bench_runner import bytes_per_decode_token  # noqa: E402
from scout_slice import write_slice  # noqa: E402

from llama4_local import pages  # noqa: E402
from llama4_local.checkpoint import head_sidecar  # noqa: E402
from llama4_local.loader import load_model  # noqa: E402
from quant import cpu_kernel  # noqa: E402
from quant.calibrate import DEFAULT_TEXT, DEFAULT_TOKENS, WINDOW  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


SLICE = {"layers": 4, "experts": 4, "vocab": 600}  # the checkpoint


def stem(shape: dict[str, int]) -> str:
    """The slice's file names: `scout-slice` for the issue's shape, its numbers in the name else."""
    if shape == SLICE:
        return "scout-slice"
    return "scout-slice-l{layers}-e{experts}-v{vocab}".format(**shape)


def prepare(
    cache: Path, threads: int, shape: dict[str, int] = SLICE, f16: bool = True
) -> tuple[Path, dict[str, Path], dict[str, float]]:
    """The llama.cpp tools, the model files, and seconds each quantize took (measured when made).
    `shape`: the slice's layers, experts and vocabulary (SLICE: the issue's; another shape gets
    its own files and no imatrix peer). `f16`: keep the F16 GGUF (a side, and what llama-quantize
    reads); a shape other than SLICE without it has it removed once the Q4 files are made (a
    16-expert slice's is 40 GB)."""
    cache.mkdir(parents=True, exist_ok=True)
    bin_dir = llamacpp.build(cache, log=log)
    name = stem(shape)
    src = cache / name
    if not (src / "model.safetensors.index.json").exists():
        log(f"writing the Scout-width slice checkpoint {name}")
        write_slice(src, **shape)
    files = {"bf16": src, "F16": cache / f"{name}-f16.gguf", "int4": cache / f"{name}-int4"}
    times_path = cache / ("quantize-times.json" if shape == SLICE else f"{name}-quantize-times.json")
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    files.update({kind: cache / f"{name}-{kind.lower()}.gguf" for kind in ("Q4_0", "Q4_K_M")})
    missing = [kind for kind in ("Q4_0", "Q4_K_M") if not files[kind].exists()]
    calibrated = cache / "scout-slice-q4_k_m-imatrix.gguf"
    make_calibrated = shape == SLICE and not calibrated.exists()
    if not files["F16"].exists() and (f16 or missing or make_calibrated):
        log("converting to GGUF F16 with llama.cpp's convert_hf_to_gguf.py")
        llamacpp.convert(cache, src, files["F16"])
    for kind in missing:
        log(f"llama-quantize {kind}")
        times[kind] = llamacpp.quantize(bin_dir, files["F16"], files[kind], kind, threads)
    # llama.cpp's calibrated path, the peer of our calibrated default: an importance matrix over
    # the same text and token count, then Q4_K_M with it (timed, not benchmarked: same speed).
    if make_calibrated:
        imatrix = cache / "scout-slice-imatrix.gguf"
        log("llama-imatrix on the calibration text, then llama-quantize Q4_K_M --imatrix")
        t_imatrix = llamacpp.imatrix(bin_dir, files["F16"], DEFAULT_TEXT, imatrix, threads, DEFAULT_TOKENS, WINDOW)
        t_quantize = llamacpp.quantize(bin_dir, files["F16"], calibrated, "Q4_K_M", threads, imatrix)
        times["Q4_K_M imatrix (llama-imatrix + llama-quantize)"] = t_imatrix + t_quantize
        times["  of which llama-imatrix"] = t_imatrix
    if not f16 and shape != SLICE and files["F16"].exists():
        files["F16"].unlink()
    if not (files["int4"] / "config.json").exists():
        log("llama4-local quantize (default INT4)")
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "cli", "quantize", str(src), str(files["int4"])]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        times["ours INT4"] = time.perf_counter() - t0
    times_path.write_text(json.dumps(times, indent=1))
    return bin_dir, files, times


class Ours:
    """A loaded checkpoint of ours, timed the way llama-bench times (no sampling, greedy argmax)."""

    def __init__(self, path: Path, dtype: str = "bfloat16", int8_attention: bool = False):
        t0 = time.perf_counter()
        self.model, self.cfg = load_model(path, dtype, "cpu", int8_attention=int8_attention, mmap=None)  # as the CLI
        self.load_s = time.perf_counter() - t0
        self.bytes_per_token = bytes_per_decode_token(self.model)

    @torch.inference_mode()
    def run(self, threads: int, prompt: int, gen: int, depth: int = 0) -> dict[str, float]:
        """Prefill and decode tok/s, each after `depth` tokens already in the cache (untimed, as
        llama-bench -d fills them)."""
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.cfg.vocab_size, (prompt,), generator=g)
        context = torch.randint(0, self.cfg.vocab_size, (depth,), generator=g)
        self.model(ids[:8], self.model.new_cache(8))  # warm-up, as llama-bench does
        cache = self.filled_cache(context, prompt)
        t0 = time.perf_counter()
        int(self.model(ids, cache)[-1].argmax())
        prefill = prompt / (time.perf_counter() - t0)
        cache, token = self.filled_cache(context, gen + 1), torch.tensor([1])
        t0 = time.perf_counter()
        for _ in range(gen):
            token = self.model(token, cache)[-1].argmax().reshape(1)
        return {"prefill": prefill, "decode": gen / (time.perf_counter() - t0)}

    def filled_cache(self, context: torch.Tensor, room: int):
        """A cache holding `context` (prefilled 512 tokens at a time) with room for `room` more."""
        cache = self.model.new_cache(context.numel() + room)
        for i in range(0, context.numel(), 512):
            self.model(context[i : i + 512], cache)
        return cache


class FreshOurs:
    """The same timing in a new process per call (load, warm-up, run), as llama-bench runs: a
    long-lived bench process that has run llama-bench beside it was seen to stay in a slow state
    on a 2-vCPU VM (two-thread decode 34-36 tok/s there, 46-48 in a fresh process right after)."""

    def __init__(self, path: Path, dtype: str = "bfloat16", int8_attention: bool = False, env: dict | None = None):
        self.spec = {"path": str(path), "dtype": dtype, "int8_attention": int8_attention}
        self.env = {**os.environ, **(env or {})}  # e.g. AS_AVX2

    def run(self, threads: int, prompt: int, gen: int, depth: int = 0) -> dict[str, float]:
        spec = {**self.spec, "threads": threads, "prompt": prompt, "gen": gen, "depth": depth}
        cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
        r = subprocess.run(cmd, check=True, capture_output=True, text=True, env=self.env)
        return json.loads(r.stdout.strip().splitlines()[-1])


def child(spec: dict) -> None:
    """One FreshOurs call: load, time, print the result as JSON."""
    torch.set_num_threads(spec["threads"])
    cpu_kernel.available()
    o = Ours(Path(spec["path"]), spec["dtype"], spec["int8_attention"])
    print(json.dumps(o.run(spec["threads"], spec["prompt"], spec["gen"], spec["depth"])))


AS_AVX2 = cpu_kernel.AVX2_HOLD  # what an AVX2-only CPU (CI's kind) has, imposed on this one


def build_kernels(avx2: bool) -> None:
    """The kernel extension each side of ours loads (native, and held to AVX2), built before timing."""
    for env in [{}] + [AS_AVX2] * avx2:
        warm = [sys.executable, "-c", "from quant import cpu_kernel; cpu_kernel.available()"]
        subprocess.run(warm, check=True, cwd=ROOT, env={**os.environ, **env})


def quantize_side_by_side(
    cache: Path, bin_dir: Path, files: dict[str, Path], threads: int, reps: int, avx2: bool
) -> None:
    """llama-quantize Q4_K_M against our quantize (default and --no-calibrate; `avx2`: also the
    default held to AVX2, AS_AVX2) on the slice, alternated `reps` times in one run (each output
    written to a scratch path, then removed)."""

    def ours(*extra: str, env: dict | None = None):
        def run(out: Path) -> None:
            cmd = [sys.executable, "-m", "cli", "quantize", str(files["bf16"]), str(out), "--threads", str(threads)]
            env_ = {**os.environ, **(env or {})}
            subprocess.run([*cmd, *extra], check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env_)

        return run

    native = "llama-quantize Q4_K_M"
    sides = {
        native: lambda out: llamacpp.quantize(bin_dir, files["F16"], out, "Q4_K_M", threads),
        "ours default (GPTQ)": ours(),
        "ours --no-calibrate": ours("--no-calibrate"),
    }
    peer_of = dict.fromkeys(sides, native)  # each side against the peer built for the same instructions
    if avx2:  # both sides held to AVX2: llama.cpp built for it (no -march=native), ours under AS_AVX2
        avx2_bin, held = llamacpp.build(cache, log=log, avx2=True), "llama-quantize Q4_K_M, AVX2 build"
        sides[held] = lambda out: llamacpp.quantize(avx2_bin, files["F16"], out, "Q4_K_M", threads)
        sides["ours default, held to AVX2 (emulated)"] = ours(env=AS_AVX2)
        peer_of |= dict.fromkeys((held, "ours default, held to AVX2 (emulated)"), held)
    build_kernels(avx2)
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for rep in range(reps):
            for name, run in sides.items():
                out = Path(tmp) / "out"
                t0 = time.perf_counter()
                run(out)
                seconds = time.perf_counter() - t0
                if out.is_dir():
                    shutil.rmtree(out)
                else:
                    out.unlink()
                best[name] = min(best.get(name, seconds), seconds)
                log(f"rep {rep + 1} {name}: {seconds:.1f} s")
    print(f"\nquantize, {threads} threads, best of {reps} alternated:")
    for name, seconds in best.items():
        peer = peer_of[name]
        print(f"  {name}: {seconds:.1f} s ({seconds / best[peer]:.2f}x {peer})")


def weight_files(model_dir: Path) -> list[Path]:
    """A checkpoint of ours' files that a run maps: shards, and the lm_head's sidecar."""
    side = head_sidecar(model_dir)
    return sorted(model_dir.glob("*.safetensors")) + ([side] if side else [])


def read_once(model_dir: Path) -> float:
    """Seconds to read every shard of a checkpoint once (from the page cache if it holds them)."""
    t0 = time.perf_counter()
    for f in weight_files(model_dir):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return time.perf_counter() - t0


def same_page_cache(files: list[Path]) -> dict[str, float]:
    """Every side's files in the page cache the same way, before any timing: where a mapping gets
    less than 90% of a file in 2 MB pages (pages faulted in through a mapping, or evicted and
    faulted back), drop it from the cache and read it through (large folios, where the kernel
    makes them). llama.cpp maps its GGUF as we map our shards (and repacks Q4_0 and Q4_K into
    anonymous memory from there), so both profit alike; returns each file's share after."""
    out = {}
    for f in files:
        if pages.file_huge_fraction(f) < 0.9 and hasattr(os, "posix_fadvise"):
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            pages.read_through(f)
        out[f.name] = pages.file_huge_fraction(f)
    return out


def memory_status() -> dict[str, int]:
    """This process's resident memory, anonymous and file-backed, in bytes (Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default=",".join(str(t) for t in sorted({1, os.cpu_count() or 1})))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--depth", type=int, default=0, help="tokens already in the context (llama-bench -d)")
    ap.add_argument("--cache", type=Path, default=CACHE)
    for key, value in SLICE.items():
        ap.add_argument(f"--{key}", type=int, default=value, help=f"the slice's {key} (default {value}: the issue's)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-bf16", action="store_true", help="only the INT4 / Q4 sides (faster)")
    ap.add_argument("--bf16-attention", action="store_true", help="also ours INT4 with attention kept in bf16")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=DIR", help="another checkpoint of ours")
    ap.add_argument("--quantize", action="store_true", help="instead: quantize times, alternated --reps times")
    ap.add_argument(
        "--avx2",
        action="store_true",
        help="both sides held to AVX2 (emulated): llama.cpp's AVX2 build, ours under AS_AVX2 "
        "(with --quantize: beside the unheld sides)",
    )
    ap.add_argument(
        "--in-process", action="store_true", help="time our side in this process (default: a fresh one per run)"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    threads = [int(t) for t in args.threads.split(",")]
    shape = {key: getattr(args, key) for key in SLICE}
    if shape["layers"] < 4:  # its Llama 4 graph takes every fourth layer as NoPE and aborts with none
        ap.error("--layers: llama.cpp runs a Llama 4 of at least 4 layers")
    bin_dir, files, qtimes = prepare(args.cache, max(threads), shape, f16=args.quantize or not args.no_bf16)
    if args.quantize:
        return quantize_side_by_side(args.cache, bin_dir, files, max(threads), args.reps, args.avx2)
    if args.avx2:  # an AVX2-only CPU's run, emulated: llama-bench built for it, ours held in each fresh process
        if args.in_process:
            ap.error("--avx2 holds our side in fresh processes; leave out --in-process")
        bin_dir = llamacpp.build(args.cache, log=log, avx2=True)
        build_kernels(avx2=True)

    if not args.avx2 and not llamacpp.runs_here(bin_dir, files["Q4_0"]):
        log("llama-bench (native build) died on Q4_0 here (its AMX backend): the peer is its AVX-512 build without AMX")
        bin_dir = llamacpp.build(args.cache, log=log, no_amx=True)
        if not llamacpp.runs_here(bin_dir, files["Q4_0"]):
            raise SystemExit("llama-bench dies on Q4_0 here without AMX too: no peer to measure")
        peer_note = ", llama.cpp built without AMX (its AMX backend dies here)"
    else:
        peer_note = ""

    log("loading our INT4 and bf16 checkpoints")
    cpu_kernel.available()  # a (re)build of the kernel extension is not loading time
    read_s = read_once(files["int4"])  # the bytes once (what a cold start adds), and a warm page cache
    shares = same_page_cache(weight_files(files["int4"]) + [files[k] for k in ("Q4_0", "Q4_K_M")])
    log("page cache mapped in 2 MB pages: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    before = memory_status()
    ours = {"ours INT4": Ours(files["int4"], int8_attention=True)}  # what prompt/chat/serve run by default
    after_int4 = memory_status()
    if not args.no_bf16:
        ours["ours bf16"] = Ours(files["bf16"])
    if args.bf16_attention:
        ours["ours INT4, bf16 attn"] = Ours(files["int4"])
    for item in args.also:
        name, _, path = item.partition("=")
        ours[name] = Ours(Path(path))
    cfg = ours["ours INT4"].cfg
    timed = dict(ours)
    if not args.in_process:  # the loads above give bytes and memory; each timing loads afresh
        specs = {"ours INT4": (files["int4"], "bfloat16", True), "ours bf16": (files["bf16"], "bfloat16", False)}
        specs["ours INT4, bf16 attn"] = (files["int4"], "bfloat16", False)
        specs.update({item.partition("=")[0]: (Path(item.partition("=")[2]), "bfloat16", False) for item in args.also})
        timed = {name: FreshOurs(*specs[name], env=AS_AVX2 if args.avx2 else None) for name in ours}
    src = llamacpp.source_dir(args.cache)
    peers = {k: files[k] for k in ("Q4_0", "Q4_K_M", "F16") if k != "F16" or not args.no_bf16}
    nbytes = {k: llamacpp.decode_bytes(p, cfg.top_k, cfg.num_experts, src) for k, p in peers.items()}
    nbytes.update({k: o.bytes_per_token for k, o in ours.items()})

    best: dict[tuple[str, int], dict[str, float]] = {}
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    sides = [*peers, *ours]
    for rep in range(args.reps):
        for t in threads:
            order = sides[rep % len(sides) :] + sides[: rep % len(sides)]  # a different side first each rep
            for side in order:
                if side in peers:
                    r = llamacpp.bench(bin_dir, peers[side], t, args.prompt, args.gen, depth=args.depth)
                else:
                    r = timed[side].run(t, args.prompt, args.gen, args.depth)
                runs.setdefault((side, t), []).append(r)
                b = best.setdefault((side, t), {"prefill": 0.0, "decode": 0.0})
                for k in b:
                    b[k] = max(b[k], r[k])
                log(f"rep {rep + 1} threads {t} {side:10s} prefill {r['prefill']:6.1f} decode {r['decode']:5.1f} tok/s")

    rows = []
    base = {name: "Q4_0" for name in ours} | {"ours bf16": "F16"}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    machine += ", both sides held to AVX2 (emulated)" if args.avx2 else peer_note
    print(f"\n{machine}, llama-cpp-python {llamacpp.VERSION}; prefill {args.prompt}, decode {args.gen}, "
          f"depth {args.depth}, best of {args.reps}")  # fmt: skip
    print("| threads | side | prefill tok/s | decode tok/s | vs peer (prefill, decode) | MB/token | decode GB/s |")
    print("|---|---|---|---|---|---|---|")
    for t in threads:
        for side in sides:
            b, mb = best[(side, t)], nbytes[side] / 1e6
            row = {"threads": t, "side": side, **{k: round(v, 2) for k, v in b.items()}, "MB_per_token": round(mb)}
            row["decode_GB_s"] = round(b["decode"] * mb / 1e3, 1)
            ratio = ""
            if side in base:
                peer = best[(base[side], t)]
                row["prefill_ratio"] = round(b["prefill"] / peer["prefill"], 2)
                row["decode_ratio"] = round(b["decode"] / peer["decode"], 2)
                ratio = f"{row['prefill_ratio']:.2f}x, {row['decode_ratio']:.2f}x {base[side]}"
            cells = [t, side, f"{b['prefill']:.1f}", f"{b['decode']:.1f}", ratio, f"{mb:.0f}", row["decode_GB_s"]]
            print("| " + " | ".join(map(str, cells)) + " |")
            for k in ("prefill", "decode"):  # the median of the reps: this VM's states move the best
                row[f"{k}_median"] = round(statistics.median(r[k] for r in runs[(side, t)]), 2)
            rows.append(row)
    print("\nmedians of the reps (prefill / decode tok/s):")
    for t in threads:
        med = {r["side"]: r for r in rows if r["threads"] == t}
        parts = [f"{k} {v['prefill_median']:.1f} / {v['decode_median']:.1f}" for k, v in med.items()]
        for side, peer in base.items():
            if side in med and peer in med:
                ratio = [med[side][f"{k}_median"] / med[peer][f"{k}_median"] for k in ("prefill", "decode")]
                parts.append(f"{side} vs {peer} {ratio[0]:.2f}x / {ratio[1]:.2f}x")
        print(f"  {t} thread(s): " + "; ".join(parts))
    int4 = ours["ours INT4"]
    size = sum(f.stat().st_size for f in weight_files(files["int4"]))
    anon = after_int4.get("RssAnon", 0) - before.get("RssAnon", 0)
    filed = after_int4.get("RssFile", 0) - before.get("RssFile", 0)
    end = memory_status()
    print(f"\nreading our INT4 checkpoint's files once: {read_s:.1f} s ({size / 1e9:.2f} GB); then loading it "
          f"(page cache warm): {int4.load_s:.2f} s; "
          f"resident after load: +{anon / 1e9:.2f} GB anonymous, +{filed / 1e9:.2f} GB file-backed")  # fmt: skip
    gb = {k: v / 1e9 for k, v in end.items()}
    print(f"this process after the runs (every model of ours loaded): {gb.get('RssAnon', 0):.2f} GB anonymous, "
          f"{gb.get('RssFile', 0):.2f} GB file-backed, peak {gb.get('VmHWM', 0):.2f} GB")  # fmt: skip
    if qtimes:
        print("quantize times (s, measured when each file was made): "
              + ", ".join(f"{k} {v:.0f}" for k, v in qtimes.items()))  # fmt: skip
    if args.json:
        memory = {"int4_read_s": read_s, "int4_load_s": int4.load_s, "int4_anon_bytes": anon, "int4_file_bytes": filed}
        args.json.write_text(json.dumps({"rows": rows, "quantize_s": qtimes, "memory": memory}, indent=1))


if __name__ == "__main__":
    main()

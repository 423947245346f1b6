#!/usr/bin/env bash
# One device session's checks for the GPU issue, in one command, each part time-boxed and logged
# under $OUT (the device tool brings $OUT back): environment, `pytest -m cuda`, the INT4 CPU
# kernel's thread scaling on the GPU host (and decode's host time a layer), the vision tower on
# the GPU, offloaded Scout at 80 and 24 GiB.
# Usage (repo root, on the GPU machine): OUT=dir bash benchmarks/gpu_checks.sh [parts]
# parts: any of env,tests,offload,threads,vision,triton,graph,matmul (default: all, in this order),
# and peer (llama.cpp with CUDA against us on the Scout-width slice).
# Before the session, here: PY=<python 3.12 + torch 2.11> bash benchmarks/gpu_prebuild.sh (our
# CPU kernel into .kbuild, ~45 s of device time saved a machine); for peer, `python
# benchmarks/gpu_vs_llamacpp.py --pack .peer/llama.cpp-src.tar.xz` and, with that Python,
# `--prebuild .peer/llama.cpp-cuda90.tar.xz` (30 minutes on 2 cores; the device would spend
# ~4 of its minutes on it).
# A session has about 15 device minutes and a start costs about 40 s: e.g. first
# `STOCK=0 bash benchmarks/gpu_checks.sh env,tests,graph` carrying .whl and .kbuild (about 5-6
# minutes; graph runs its bench twice, stock and Triton INT4, unless STOCK=0), then offload with
# BUDGETS=24 MISS=auto,swap and triton (HOST_ROWS=379 for a 32 GB machine's host tier,
# INCLUSIVE_HOST=1 for the tier before session 31), then peer carrying .peer and .kbuild
# (57 MB of the 64 MiB a call carries; leave .whl out).
set -u
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# The CPU kernel prebuilt for the image's torch and Python (benchmarks/gpu_prebuild.sh here; carry
# .kbuild): ~45 s of device time saved a machine; a build that does not import there is redone.
if [ -d .kbuild ]; then export TORCH_EXTENSIONS_DIR=$PWD/.kbuild/$(python3 benchmarks/kbuild_tag.py); fi
parts=${1:-env,tests,offload,threads,vision,triton,graph,matmul}
stamp() { echo "== $1 $(date -u +%FT%TZ)" | tee -a "$OUT/log.txt"; }
has() { [[ ",$parts," == *",$1,"* ]]; }

if has env; then
  stamp env
  { nvidia-smi; lscpu | head -25; free -g; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__)'; } \
    >"$OUT/env.txt" 2>&1
  python3 -c 'from quant import cpu_kernel; print("cpu kernel", cpu_kernel.available(), cpu_kernel.isa())' >>"$OUT/env.txt" 2>&1
fi
if has tests; then
  stamp tests
  # The image has pytest-xdist: the tests' compiling (Triton, inductor) spreads over the host's
  # cores in TEST_WORKERS processes, one CUDA context each (TEST_WORKERS=0: one process).
  workers=()
  if [ "${TEST_WORKERS:-4}" != 0 ] && python3 -c 'import xdist' 2>/dev/null; then workers=(-n "${TEST_WORKERS:-4}"); fi
  timeout "${TESTS_S:-150}" python3 -m pytest -q -m cuda tests/test_cuda.py tests/test_quant_kernels.py tests/test_graph_decode.py tests/test_piecewise_decode.py -p no:cacheprovider --timeout 100 \
    "${workers[@]}" --tb=short -rfE --durations=8 >"$OUT/pytest.txt" 2>&1
  tail -5 "$OUT/pytest.txt" | tee -a "$OUT/log.txt"
fi
if has offload; then
  stamp offload
  timeout "${OFFLOAD_S:-290}" python3 benchmarks/bench_offload_gpu.py --budgets "${BUDGETS:-80,24}" \
    --miss-policies "${MISS:-swap,cpu,auto}" --prompt-tokens 256 --gen-tokens 32 ${HOST_ROWS:+--host-rows "$HOST_ROWS"} \
    ${INCLUSIVE_HOST:+--inclusive-host} >"$OUT/offload.jsonl" 2>&1
  free -g >>"$OUT/offload.jsonl"
fi
if has threads; then
  stamp threads
  # the bf16-GEMM INT4 path on this host's CPU (AMX: oneDNN's real kernels), then the timings
  timeout 60 python3 -m pytest -q tests/test_int4_gemm.py -p no:cacheprovider >"$OUT/int4_gemm_tests.txt" 2>&1
  tail -1 "$OUT/int4_gemm_tests.txt" | tee -a "$OUT/log.txt"
  timeout "${THREADS_S:-90}" python3 benchmarks/bench_cpu_threads.py --threads 1,2,4,8,16 --chunks 2,8,32 \
    --crossover 8,16,32,64,128,512 --stream-prefetch 1024:nta,2048:nta,4096:nta,4096:t0,4096:t1,8192:t1,4096:t2 \
    >"$OUT/threads.jsonl" 2>&1
  # decode's host time a layer, Python layer against the one-call C++ layer (~15 s on 2 cores)
  timeout "${HOST_S:-60}" python3 benchmarks/bench_decode_host.py --threads 1,4,16 --reps 3 >"$OUT/decode_host.jsonl" 2>&1
fi
if has vision; then
  stamp vision
  timeout "${VISION_S:-45}" python3 benchmarks/bench_vision.py --device cuda --streamed 17 --json >"$OUT/vision.txt" 2>&1
fi
if has triton; then
  stamp triton
  timeout "${TRITON_S:-120}" python3 benchmarks/bench_triton_int4.py --rows "${TRITON_ROWS:-1,2,4,8,64,512,2048}" \
    >"$OUT/triton.jsonl" 2>&1
fi
if has graph; then
  stamp graph
  ways=${WAYS:-eager,graph,graph_plain}
  if [ "${STOCK:-1}" != 0 ]; then  # torch's stock INT4 kernel beside Triton's (STOCK=0: Triton's alone)
    LLAMA4_LOCAL_CUDA_INT4=stock timeout "${GRAPH_S:-120}" python3 benchmarks/bench_graph_decode.py --ways "$ways" \
      --profile "$OUT/profile.txt" \
      >"$OUT/graph.jsonl" 2>&1
  fi
  LLAMA4_LOCAL_CUDA_INT4=triton timeout "${GRAPH_S:-120}" python3 benchmarks/bench_graph_decode.py \
    --ways "${WAYS_TRITON:-eager,graph,graph_q6,graph_plain}" --profile "$OUT/profile_triton.txt" \
    >"$OUT/graph_triton.jsonl" 2>&1
fi
if has peer; then  # llama.cpp with CUDA against us on the Scout-width slice; carry .peer (see the script)
  stamp peer
  bins=(); if [ -f .peer/llama.cpp-cuda90.tar.xz ]; then bins=(--bins .peer/llama.cpp-cuda90.tar.xz); fi
  timeout "${PEER_S:-560}" python3 benchmarks/gpu_vs_llamacpp.py --source .peer/llama.cpp-src.tar.xz "${bins[@]}" \
    --work /tmp/peer >"$OUT/peer.jsonl" 2>"$OUT/peer.err"
  tail -c 3000 "$OUT/peer.err" >"$OUT/peer_tail.txt"; rm -f "$OUT/peer.err"
fi
if has matmul; then
  stamp matmul
  timeout "${MATMUL_S:-40}" python3 benchmarks/bench_int4_matmul.py --device cuda --rows 1,8,64,512,2048 --reps 5 \
    >"$OUT/matmul.jsonl" 2>&1
fi
stamp done

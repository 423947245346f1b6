"""The static decode step with every INT4 linear on the Triton path (the CUDA default) against
the eager model on the same path, in float32, on the CPU through Triton's interpreter:
`TRITON_INTERPRET=1 python -m tests.triton_decode_check CHECKPOINT` (an INT4 checkpoint; the
variable set before Triton is imported). Prints "ok", or why not and exits 1.

On CUDA the kernels run compiled (tests/test_cuda.py); here each kernel's arithmetic is numpy's,
but what the step does around them is the GPU's: the experts stacked with the shared one, each
row through its expert by a device index (quant/triton_experts.py), the routing on the device."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from quant import kernels, triton_experts, triton_int4


def on_triton(kernel_for):
    """kernel_for that sends every CPU weight Triton can take to the Triton path."""

    def pick(qw, device, dtype):
        n, k = getattr(qw, "shape", (0, 0))
        if device.type == "cpu" and isinstance(qw, kernels.Int4Weight) and triton_int4.supports(n, k, qw.group_size):
            return "triton"
        return kernel_for(qw, device, dtype)

    return pick


def main(ckpt: Path, steps: int = 6) -> list[str]:
    from llama4_local.graph_decode import greedy_static
    from llama4_local.loader import load_model

    kernels.kernel_for = on_triton(kernels.kernel_for)
    model, _ = load_model(ckpt, "float32", "cpu")
    fails = []
    paths = {m.path for m in model.modules() if hasattr(m, "path") and hasattr(m, "group_size")}
    if paths != {"triton"}:
        fails.append(f"INT4 linears on paths {sorted(paths)}, not all on triton")
    # 6 + 6 positions: the decode steps cross the test configs' attention chunk boundary at 8
    prompt = torch.randint(0, 300, (6,), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(prompt.shape[0] + steps)
    logits, want, tokens = model(prompt, cache), [], []
    with torch.inference_mode():
        for _ in range(steps):
            tokens.append(int(logits[-1].argmax()))
            logits = model(torch.tensor([tokens[-1]]), cache)
            want.append(logits)
    calls = []
    gemv = triton_experts.experts_gemv
    triton_experts.experts_gemv = lambda *a, **k: calls.append(1) or gemv(*a, **k)
    _, got = greedy_static(model, prompt, steps, graph=False, feed=tokens)
    if not calls:
        fails.append("the static step did not run its experts through quant.triton_experts")
    want = torch.cat(want).float()
    err = ((got.float() - want).norm() / want.norm()).item()
    print(f"static against eager: relative error {err:.3g}, {len(calls)} expert launches")
    if err > 1e-5:  # float32: the same kernels in another order at most
        fails.append(f"static step against eager: relative error {err:.3g}")
    return fails


if __name__ == "__main__":
    problems = main(Path(sys.argv[1]))
    print("\n".join(problems) or "ok")
    sys.exit(1 if problems else 0)

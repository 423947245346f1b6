"""The llama.cpp anchor (benchmarks/kquants.py): its Q4_K values are real Q4_K blocks.

The benchmark's Q4_K_M comparison is only as good as its Q4_K. Here every value it produces is
packed into GGUF block_q4_K bytes and decoded by the `gguf` package (llama.cpp's own Python
reader): the decoded weights must equal the benchmark's, bit for bit.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from kquants import pack_q4_k, q4_k, q4_k_parts, q6_k  # noqa: E402


@pytest.mark.parametrize("kind", ["gauss", "student_t", "with_zero_blocks"])
def test_q4_k_values_decode_from_real_blocks(kind):
    gguf = pytest.importorskip("gguf")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 768, generator=g) * 0.02
    if kind == "student_t":
        w = torch.distributions.StudentT(5.0).sample((24, 768)) * 0.02
    if kind == "with_zero_blocks":
        w[3, :256] = 0
        w[5, 32:64] = 0
    blocks = pack_q4_k(q4_k_parts(w)).numpy()
    decoded = gguf.quants.dequantize(blocks.reshape(24, -1), gguf.GGMLQuantizationType.Q4_K)
    assert torch.equal(torch.from_numpy(decoded), q4_k(w))


def test_k_quant_errors_are_in_their_ranges():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(2))
    rel = lambda a: ((a - w).norm() / w.norm()).item()  # noqa: E731
    assert 0.05 < rel(q4_k(w)) < 0.09  # 4.5 bits per weight
    assert 0.01 < rel(q6_k(w)) < 0.025  # 6.5 bits per weight

"""INT4 kernels against the dequantize-then-matmul reference."""

import pytest
import torch

from quant.int4 import quantize_int4
from quant.kernels import Int4Linear, kernel_for


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_cpu_kernel_matches_reference(group_size, symmetric, dtype, rows):
    # float32 activations are served by the reference path unless the kernel is forced.
    g = torch.Generator().manual_seed(group_size + rows)
    qw = quantize_int4(torch.randn(96, 256, generator=g), group_size, symmetric, scale_dtype=torch.bfloat16)
    cpu = torch.device("cpu")
    assert kernel_for(qw, cpu, dtype) == ("cpu" if dtype == torch.bfloat16 else "reference")
    x = torch.randn(rows, 256, generator=g).to(dtype)
    got = Int4Linear(qw, cpu, dtype, path="cpu")(x)
    want = Int4Linear(qw, cpu, torch.float32, path="reference")(x.float())
    assert got.dtype == dtype and got.shape == (rows, 96)
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_unsupported_shape_falls_back_to_reference():
    qw = quantize_int4(torch.randn(8, 48), 16)  # K = 48 is not a multiple of 32
    lin = Int4Linear(qw, "cpu", torch.float32)
    assert lin.path == "reference"
    x = torch.randn(2, 48)
    assert lin(x).shape == (2, 8)


@pytest.mark.cuda
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 16])
def test_cuda_kernel_matches_reference(symmetric, rows):
    g = torch.Generator().manual_seed(rows)
    qw = quantize_int4(torch.randn(256, 512, generator=g), 128, symmetric, scale_dtype=torch.bfloat16)
    dev = torch.device("cuda")
    lin = Int4Linear(qw, dev, torch.bfloat16)
    assert lin.path == "cuda"
    x = torch.randn(rows, 512, generator=g).to(dev, torch.bfloat16)
    want = Int4Linear(qw, dev, torch.float32, path="reference")(x.float())
    assert rel_err(lin(x), want) < 1e-2

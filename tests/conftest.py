import pytest
import torch

from tests.factory import write_checkpoint
from tests.oracle_images import import_torchvision

# transformers imports torchvision when it is installed; make that import work on CPU torch
# before any test imports transformers (see tests/oracle_images.py).
import_torchvision()


def pytest_sessionstart(session):
    """Build the CPU kernel once before any test runs the CLI in a subprocess: on a clean machine
    the first INT4 or bf16 run prints a one-off "building" line on stderr, which the tests that
    expect a command's only stderr line to be its error would otherwise meet in whatever order
    they run."""
    from quant import cpu_kernel

    cpu_kernel.available()


@pytest.fixture
def gemm_rows(monkeypatch):
    """Set LLAMA4_LOCAL_INT4_BF16_GEMM for one test (the choice is cached per process)."""
    from quant import cpu_kernel

    def set_rows(value: str):
        monkeypatch.setenv("LLAMA4_LOCAL_INT4_BF16_GEMM", value)
        cpu_kernel.bf16_gemm_rows.cache_clear()

    yield set_rows
    monkeypatch.delenv("LLAMA4_LOCAL_INT4_BF16_GEMM", raising=False)
    cpu_kernel.bf16_gemm_rows.cache_clear()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def scout_ckpt(tmp_path_factory):
    """Scout-like: every layer MoE, qk-norm, llama3 scaling; text-only, single file."""
    return write_checkpoint(tmp_path_factory.mktemp("scout"), "scout")


@pytest.fixture(scope="session")
def maverick_ckpt(tmp_path_factory):
    """Maverick-like: dense and MoE interleaved, no qk-norm; sharded."""
    return write_checkpoint(tmp_path_factory.mktemp("maverick"), "maverick", shard_size="200KB")


@pytest.fixture(scope="session")
def multimodal_ckpt(tmp_path_factory):
    """Llama4ForConditionalGeneration with a small vision tower, 4.x config spelling, top-2 routing."""
    return write_checkpoint(
        tmp_path_factory.mktemp("multimodal"), "top2", multimodal=True, shard_size="150KB", spelling="4.x"
    )


@pytest.fixture(scope="session")
def all_ckpts(scout_ckpt, maverick_ckpt, multimodal_ckpt):
    return {"scout": scout_ckpt, "maverick": maverick_ckpt, "multimodal": multimodal_ckpt}


def quantize_plain(src, out):
    """`src` quantized into `out` as the tests' INT4 checkpoints are (group 64, symmetric, the plain
    fit, attention left bf16, so tests can rebuild every weight with quantize_int4); the summary."""
    from quant.quantize import QuantizeOptions, quantize_checkpoint

    return quantize_checkpoint(src, out, QuantizeOptions(group_size=64, shard_bytes=300_000, calibrate=False))


@pytest.fixture(scope="session")
def scout_int4(tmp_path_factory, scout_ckpt):
    """The Scout-like checkpoint quantized by quantize_plain: (directory, summary)."""
    out = tmp_path_factory.mktemp("q") / "scout-int4"
    return out, quantize_plain(scout_ckpt, out)

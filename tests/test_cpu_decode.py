"""A decoder layer's decode step in one C++ call (llama4_local/cpu_decode.py, quant/layer_kernel.py)
against the Python layer it replaces: the same logits bit for bit, across chunk boundaries, NoPE
temperature, qk-norm, dense and MoE layers, top-1 and top-2 routing, INT4 and bf16 attention,
both INT4 activation paths, bf16 checkpoints; and the Python layer wherever the C++ one cannot
serve."""

import pytest
import torch

from llama4_local import cpu_decode
from llama4_local.loader import load_model
from quant import cpu_kernel
from quant.kernels import use_cpu_path
from quant.quantize import QuantizeOptions, quantize_checkpoint

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="no AVX2/FMA CPU or no C++ compiler")

PROMPT = torch.randint(0, 300, (13,), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def int4_all(tmp_path_factory, all_ckpts):
    """Each kind quantized with attention too (group 32, asymmetric), as the default quantizes."""
    out = {}
    for kind, src in all_ckpts.items():
        dst = tmp_path_factory.mktemp("cpu-decode") / kind
        opts = QuantizeOptions(
            group_size=32, symmetric=False, calibrate=False, parts=("experts", "shared", "attention", "mlp")
        )
        quantize_checkpoint(src, dst, opts)
        out[kind] = dst
    return out


def decode(model, python: bool, monkeypatch, n: int = 22, keep_previous: bool = False, fresh: bool = True):
    """Prefill, then n greedy steps (positions 13..34: chunk 8's boundaries at 16, 24 and 32);
    `fresh`: plans made anew (the env var is read when a plan is made)."""
    if python:
        monkeypatch.setenv("LLAMA4_LOCAL_PY_DECODE", "1")
    else:
        monkeypatch.delenv("LLAMA4_LOCAL_PY_DECODE", raising=False)
    if fresh:
        cpu_decode.invalidate()
    cache = model.new_cache(PROMPT.shape[0] + n, keep_previous=keep_previous)
    logits = model(PROMPT, cache)
    tokens, out = [], []
    for _ in range(n):
        tokens.append(int(logits[-1].argmax()))
        logits = model(torch.tensor([tokens[-1]]), cache)
        out.append(logits)
    return tokens, torch.cat(out), cache


def served(model) -> int:
    return sum(cpu_decode.plan(layer) is not None for layer in model.layers)


@pytest.mark.parametrize("kind", ["scout", "maverick", "multimodal"])
@pytest.mark.parametrize("path", ["avx2_q8", "avx2"])
def test_cpu_decode_layer_equals_python_layer(int4_all, kind, path, monkeypatch):
    model, _ = load_model(int4_all[kind], "bfloat16", "cpu")
    use_cpu_path(model, path)
    want_tokens, want, _ = decode(model, True, monkeypatch)
    assert served(model) == 0
    tokens, got, _ = decode(model, False, monkeypatch, keep_previous=kind == "scout")
    assert served(model) == model.cfg.num_layers
    assert tokens == want_tokens
    assert torch.equal(got, want)


def test_bf16_attention_and_a_kernel_path_switch(scout_int4, monkeypatch):
    """Attention left bf16 (half_mv), group 64 symmetric; a plan made for int8 activations is
    dropped when the model switches to float ones (use_cpu_path), not reused."""
    model, _ = load_model(scout_int4[0], "bfloat16", "cpu")
    _, slow_q8, _ = decode(model, True, monkeypatch)
    _, fast_q8, _ = decode(model, False, monkeypatch)  # plans made for avx2_q8 ...
    assert served(model) == model.cfg.num_layers
    assert torch.equal(fast_q8, slow_q8)
    use_cpu_path(model, "avx2")  # ... dropped here
    _, fast, _ = decode(model, False, monkeypatch, fresh=False)
    _, slow, _ = decode(model, True, monkeypatch)
    assert torch.equal(fast, slow)
    assert not torch.equal(fast, fast_q8)  # the paths differ, so a stale plan would show


@pytest.mark.parametrize("kind", ["scout", "maverick", "multimodal"])
def test_bf16_checkpoints(all_ckpts, kind, monkeypatch):
    """bf16 weights as published: attention, the shared expert and dense MLPs through half_mv,
    the routed experts in the fused [E, D, 2I] / [E, I, D] layout through half_vm (top-1 and
    top-2), dense and MoE layers interleaved (Maverick-like)."""
    model, _ = load_model(all_ckpts[kind], "bfloat16", "cpu")
    _, want, _ = decode(model, True, monkeypatch)
    _, got, _ = decode(model, False, monkeypatch)
    assert served(model) == model.cfg.num_layers
    assert torch.equal(got, want)


def test_int8_attention(scout_int4, monkeypatch):
    """Attention rounded to INT8 at load (--int8-attention): q8_mv in the C++ layer too."""
    model, _ = load_model(scout_int4[0], "bfloat16", "cpu", int8_attention=True)
    _, want, _ = decode(model, True, monkeypatch)
    _, got, _ = decode(model, False, monkeypatch)
    assert served(model) == model.cfg.num_layers
    assert torch.equal(got, want)


def test_chunk_roll_keeps_the_previous_block_as_the_python_cache(int4_all, monkeypatch):
    """With keep_previous the cache copies the block that ends; rewinding into it after C++ steps
    gives what rewinding after Python steps gives."""
    model, _ = load_model(int4_all["scout"], "bfloat16", "cpu")
    runs = []
    for python in (True, False):
        _, _, cache = decode(model, python, monkeypatch, keep_previous=True)
        assert cache.rewind(30)  # into the block [24, 32), kept when position 32 began a new one
        runs.append(model(torch.tensor([7, 8, 9]), cache))
    assert torch.equal(runs[0], runs[1])


def test_python_layer_serves_what_the_cpu_layer_cannot(scout_ckpt, int4_all, monkeypatch):
    monkeypatch.delenv("LLAMA4_LOCAL_PY_DECODE", raising=False)
    cpu_decode.invalidate()
    f32, _ = load_model(scout_ckpt, "float32", "cpu")  # float32 runs keep the Python layer
    cache = f32.new_cache(20)
    f32(PROMPT, cache)
    f32(torch.tensor([3]), cache)
    assert all(layer.__dict__.get("_cpu_decode") is None for layer in f32.layers)
    model, _ = load_model(int4_all["scout"], "bfloat16", "cpu")
    assert served(model) == model.cfg.num_layers
    seen = []
    model.layers[1].feed_forward.observer = lambda layer, idx: seen.append(layer)
    assert cpu_decode.plan(model.layers[1]) is None  # a routing recorder sees every step
    cache = model.new_cache(20)
    model(PROMPT, cache)
    model(torch.tensor([3]), cache)
    assert seen == [1, 1]
    from offload.setup import OffloadOptions

    offloaded, _ = load_model(int4_all["scout"], "bfloat16", "cpu", offload=OffloadOptions(slots=2))
    assert served(offloaded) == 0

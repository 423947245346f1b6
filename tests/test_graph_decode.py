"""The static decode step (llama4_local/graph_decode.py) against the eager model."""

import pytest
import torch

from llama4_local.errors import UserError
from llama4_local.graph_decode import StaticDecode, greedy_static
from llama4_local.loader import load_model


def rel_err(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def eager(model, prompt, n, feed=None):
    """Eager prefill, then n greedy (or fed) one-token steps: (tokens, logits [n, V])."""
    cache = model.new_cache(prompt.shape[0] + n)
    logits = model(prompt, cache)
    tokens, out = [], []
    for i in range(n):
        tok = int(logits[-1].argmax()) if feed is None else feed[i]
        tokens.append(tok)
        logits = model(torch.tensor([tok], device=prompt.device), cache)
        out.append(logits)
    return tokens, torch.cat(out)


PROMPT = torch.randint(0, 300, (11,), generator=torch.Generator().manual_seed(7))


def routes_eager(model, prompt, feed):
    """eager(...) fed `feed`, with every decode step's chosen experts: (logits, [step][layer] ids)."""
    steps: list[list[list[int]]] = []
    moe = [layer.feed_forward for layer in model.layers if layer.is_moe]
    for ff in moe:
        ff.observer = lambda layer, idx: steps[-1].append(idx[0].tolist()) if steps else None
    cache = model.new_cache(prompt.shape[0] + len(feed))
    model(prompt, cache)
    out = []
    try:
        for tok in feed:
            steps.append([])
            out.append(model(torch.tensor([tok], device=prompt.device), cache))
    finally:
        for ff in moe:
            ff.observer = None
    return torch.cat(out), steps


def routes_forced(model, prompt, feed, routes, monkeypatch):
    """greedy_static(..., graph=False) fed `feed`, each step's experts forced to `routes` (eager's
    choices; the static router's own scores for them), so both runs keep the same hidden states
    and KV cache whatever a near tie does: (logits, [step][layer] the experts the static router
    itself would have chosen)."""
    from llama4_local import fused
    from llama4_local.model import top_k_scores

    own, route = [], fused.route

    def forcing(logits, x, k, shared):
        step, layer = divmod(len(own), len(routes[0]))
        own.append(top_k_scores(logits, k, x.dtype)[0][0].tolist())
        sel = torch.tensor(routes[step][layer], device=logits.device)
        kept = torch.full_like(logits, -torch.inf)  # only eager's experts left to choose, at their own logits
        kept[:, sel] = logits[:, sel]
        return route(kept, x, k, shared)

    monkeypatch.setattr(fused, "route", forcing)
    _, logits = greedy_static(model, prompt, len(feed), graph=False, feed=feed)
    monkeypatch.setattr(fused, "route", route)
    per = len(routes[0])
    return logits, [own[i * per : (i + 1) * per] for i in range(len(feed))]


def assert_as_close_as_eager(model, exact, prompt, monkeypatch, n=16, flips=3):
    """The static step in bf16 against eager, both measured against `exact` (the same checkpoint
    in float32), all three with eager's choice of experts: each step's static logits no farther
    from float32 than 1.5x eager's distance plus 3e-3. bf16 itself is 1.6-3.4% from float32 on the
    small random INT4 model, and compiled regions round in their own places where torch's
    inductor does not emulate eager's roundings (torch 2.11, the GPU image's: 2-3.4% from eager,
    as far from float32 as eager is); a wrong kernel is 10% and more off (the float32 tests hold
    the same arithmetic to 1e-5 of eager: a 1% error in a compiled norm fails them). A near tie in a bf16
    router may go the other way (one ulp of a norm's rounding flips it on a small random model),
    so the static router's own choices may differ from eager's at `flips` steps at most."""
    want_tokens, _ = eager(model, prompt, n)
    want, eager_routes = routes_eager(model, prompt, want_tokens)
    got, static_routes = routes_forced(model, prompt, want_tokens, eager_routes, monkeypatch)
    ref, _ = routes_forced(exact, prompt.to(exact.device), want_tokens, eager_routes, monkeypatch)
    flipped = [i for i in range(n) if eager_routes[i] != static_routes[i]]
    assert len(flipped) <= flips, (flipped, eager_routes, static_routes)
    for i in range(n):
        far, eager_far = rel_err(got[i], ref[i]), rel_err(want[i], ref[i])
        assert far < 1.5 * eager_far + 3e-3, (i, far, eager_far)
    return flipped


@pytest.mark.parametrize("min_span", [512, 4])
@pytest.mark.parametrize("kind", ["scout", "maverick", "multimodal"])
def test_static_steps_equal_eager_decode_float32(all_ckpts, kind, min_span, monkeypatch):
    """Across chunk boundaries (chunk 8: positions 16 and 24), NoPE layers with temperature
    tuning, dense and MoE layers interleaved (maverick), top-2 routing (multimodal); with spans
    of 4 slots and up, steps read 16 then 32 of the NoPE layers' 27 slots (and 8 of a chunk's)."""
    from llama4_local import graph_decode

    monkeypatch.setattr(graph_decode, "MIN_SPAN", min_span)
    model, _ = load_model(all_ckpts[kind], "float32", "cpu")
    want_tokens, want = eager(model, PROMPT, 16)
    tokens, got = greedy_static(model, PROMPT, 16)
    assert tokens == want_tokens
    assert rel_err(got, want) < 1e-5


def test_compiled_regions_equal_eager_decode_float32(scout_ckpt, monkeypatch):
    """fused.py's regions compiled by inductor (its C++ backend here; Triton on CUDA) compute the
    eager step's arithmetic: across a chunk boundary, NoPE temperature and qk-norm included."""
    from llama4_local import fused

    monkeypatch.setenv("LLAMA4_LOCAL_COMPILE", "1")
    model, _ = load_model(scout_ckpt, "float32", "cpu")
    tokens, got = greedy_static(model, PROMPT, 12, graph=False)
    want_tokens, want = eager(model, PROMPT, 12)
    assert tokens == want_tokens
    assert rel_err(got, want) < 1e-5
    x, rows = torch.randn(1, 64), torch.randn(3, 64)  # two routed experts' rows and the shared one's
    h, y = fused.add_rows_norm(x, rows, torch.ones(64), 1e-5)  # compiled: what the model computes
    h2, y2 = fused.add_rows_norm.eager(x, rows, torch.ones(64), 1e-5)
    assert torch.allclose(h, h2, atol=1e-6) and torch.allclose(y, y2, atol=1e-5)


def test_a_failing_compiler_leaves_the_regions_uncompiled(scout_ckpt, monkeypatch, capsys):
    """Where torch.compile fails on a machine (a missing compiler, say), the step warns once and
    runs the regions as they are: the same tokens and logits as eager."""
    from llama4_local import fused

    def broken(fn):
        def run(*args):
            raise RuntimeError("no C compiler here")

        return run

    monkeypatch.setenv("LLAMA4_LOCAL_COMPILE", "1")
    monkeypatch.setattr(fused, "_compile", broken)
    monkeypatch.setattr(fused, "_disabled", False)
    for region in fused.REGIONS:  # compiled by earlier tests: compile again, with the broken compiler
        monkeypatch.setattr(region, "compiled", None)
    model, _ = load_model(scout_ckpt, "float32", "cpu")
    want_tokens, want = eager(model, PROMPT, 6)
    tokens, got = greedy_static(model, PROMPT, 6, graph=False)
    assert tokens == want_tokens and rel_err(got, want) < 1e-5
    assert capsys.readouterr().err.count("running them uncompiled") == 1
    assert fused._disabled


def test_auto_decodes_eagerly_on_the_cpu(scout_ckpt, monkeypatch):
    from llama4_local.graph_decode import stepper

    monkeypatch.delenv("LLAMA4_LOCAL_DECODE", raising=False)
    model, _ = load_model(scout_ckpt, "float32", "cpu")
    assert stepper(model, model.new_cache(16)) is None


def test_static_steps_on_int4_experts_bf16(scout_int4):
    model, _ = load_model(scout_int4[0], "bfloat16", "cpu")
    want_tokens, want = eager(model, PROMPT, 12)
    tokens, got = greedy_static(model, PROMPT, 12, feed=want_tokens)
    # The eager step attends with the CPU attention kernel, this one with two bmms over the
    # whole buffer: bf16 roundings in another order.
    assert rel_err(got, want) < 2e-2
    exp = model.layers[0].feed_forward.experts.experts
    stack = exp[0].gate_proj.packed.untyped_storage().data_ptr()
    # The experts' buffers became views of one stack (no second copy of the weights).
    assert all(e.gate_proj.packed.untyped_storage().data_ptr() == stack for e in exp)


def test_compiled_static_steps_on_int4_experts_bf16(scout_int4, monkeypatch):
    monkeypatch.setenv("LLAMA4_LOCAL_COMPILE", "1")
    model, _ = load_model(scout_int4[0], "bfloat16", "cpu")
    exact, _ = load_model(scout_int4[0], "float32", "cpu")
    assert_as_close_as_eager(model, exact, PROMPT, monkeypatch)


def test_span_for_covers_the_position_in_powers_of_two(scout_ckpt):
    model, _ = load_model(scout_ckpt, "float32", "cpu")
    cache = model.new_cache(3000)
    st = StaticDecode(model, cache)
    assert max(st.caps) == 3000
    assert [st.span_for(p) for p in (0, 511, 512, 1023, 1024, 2999)] == [512, 512, 1024, 1024, 2048, 3000]


def test_a_full_context_is_refused(scout_ckpt):
    model, _ = load_model(scout_ckpt, "float32", "cpu")
    cache = model.new_cache(8)
    model(PROMPT[:8], cache)
    with pytest.raises(UserError, match="context is full"):
        _ = StaticDecode(model, cache).position


def test_an_offloaded_model_is_refused(scout_int4):
    from offload.setup import OffloadOptions

    model, _ = load_model(scout_int4[0], "bfloat16", "cpu", offload=OffloadOptions(slots=2))
    with pytest.raises(UserError, match="resident"):
        StaticDecode(model, model.new_cache(32))


def two_turns(model, monkeypatch, mode):
    """generate_step twice on one cache (a chat's turns): eager prefills and `mode` decode steps
    taking turns across chunk boundaries; (tokens, the cache)."""
    from llama4_local.generate import generate_step
    from llama4_local.sampling import Sampler, SamplingParams

    monkeypatch.setenv("LLAMA4_LOCAL_DECODE", mode)
    sampler = Sampler(SamplingParams(temperature=0.0), torch.device("cpu"))
    cache = model.new_cache(40)
    steps = generate_step(model, PROMPT.tolist(), sampler, cache)
    first = [next(steps) for _ in range(7)]
    steps.close()
    steps = generate_step(model, [first[-1], 5, 6, 7, 8, 9], sampler, cache)
    second = [next(steps) for _ in range(11)]
    steps.close()
    return first + second, cache


def test_generation_through_static_steps_equals_eager(scout_ckpt, monkeypatch):
    model, _ = load_model(scout_ckpt, "float32", "cpu")
    want, want_cache = two_turns(model, monkeypatch, "eager")
    got, cache = two_turns(model, monkeypatch, "static")
    assert got == want
    assert cache.decoder is not None and cache.length == want_cache.length == 11 + 6 + 6 + 10
    for a, b in zip(cache.layers, want_cache.layers, strict=True):
        held = a.length - (a.start if a.chunked else 0)
        assert a.length == b.length and (not a.chunked or a.start == b.start)
        # float32 rounding apart: one row's products against several rows' (1.4e-6 on values up
        # to 2.8 where MKL's kernels depend on the row count, an Intel CPU's AVX-512 ones)
        assert torch.allclose(a.buf.k[:, :held], b.buf.k[:, :held], rtol=1e-5, atol=1e-5)
        assert torch.allclose(a.buf.v[:, :held], b.buf.v[:, :held], rtol=1e-5, atol=1e-5)


def test_an_unknown_decode_mode_is_a_user_error(scout_ckpt, monkeypatch):
    from llama4_local.graph_decode import decode_mode

    monkeypatch.setenv("LLAMA4_LOCAL_DECODE", "fast")
    with pytest.raises(UserError, match="LLAMA4_LOCAL_DECODE"):
        decode_mode()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_replay_equals_the_static_step_and_the_cpu(scout_int4, scout_ckpt, dtype, monkeypatch):
    from llama4_local import graph_decode

    monkeypatch.setattr(graph_decode, "MIN_SPAN", 4)  # graphs for spans 16 and 27, one pool
    path = scout_ckpt if dtype == "float32" else scout_int4[0]
    gpu, _ = load_model(path, dtype, "cuda")
    prompt = PROMPT.cuda()
    tokens, plain = greedy_static(gpu, prompt, 16, graph=False)
    g_tokens, replayed = greedy_static(gpu, prompt, 16, graph=True)
    assert g_tokens == tokens
    assert rel_err(replayed, plain) < 1e-6  # the same kernels, replayed
    if dtype == "bfloat16":  # a bf16 router's near tie may go either way: compare step by step
        assert_as_close_as_eager(gpu, load_model(path, "float32", "cpu")[0], prompt, monkeypatch)
    else:
        assert rel_err(replayed, eager(gpu, prompt, 16, feed=tokens)[1]) < 1e-5
    if dtype == "float32":
        cpu, _ = load_model(path, dtype, "cpu")
        assert rel_err(replayed, eager(cpu, PROMPT, 16, feed=tokens)[1]) < 1e-4


@pytest.fixture(scope="module")
def int4_kinds(scout_int4, maverick_ckpt, multimodal_ckpt, tmp_path_factory):
    """INT4 checkpoints (conftest.quantize_plain) of the Scout-like, Maverick-like (dense and MoE
    layers interleaved) and top-2 configs."""
    from tests.conftest import quantize_plain

    out = {"scout": scout_int4[0]}
    for kind, src in (("maverick", maverick_ckpt), ("top2", multimodal_ckpt)):
        out[kind] = tmp_path_factory.mktemp("q") / kind
        quantize_plain(src, out[kind])
    return out


@pytest.fixture(scope="module")
def interpreted(int4_kinds):
    """tests/triton_decode_check.py on each of int4_kinds through Triton's interpreter, the three
    started together (each is one Python thread: side by side on a CI host's two cores)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("no Triton (CPU wheels of torch come without it)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    runs = {}
    for kind, ckpt in int4_kinds.items():
        cmd = [sys.executable, "-m", "tests.triton_decode_check", str(ckpt)]
        runs[kind] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield runs
    for proc in runs.values():
        proc.kill()


@pytest.mark.parametrize("kind", ["scout", "maverick", "top2"])
def test_static_steps_on_triton_int4_in_the_interpreter(interpreted, kind):
    """The GPU's decode step (experts stacked with the shared one, each row through its expert by a
    device index in quant/triton_experts.py) on the CPU through Triton's interpreter, where Triton
    is installed: equal to eager on the same kernels (tests/triton_decode_check.py)."""
    out, _ = interpreted[kind].communicate(timeout=900)
    assert interpreted[kind].returncode == 0, out

"""Piecewise decode (llama4_local/piecewise_decode.py) of models with an expert cache, against
the eager offloaded model: the same tokens and logits, the expert cache doing its work."""

import pytest
import torch

from llama4_local.graph_decode import stepper
from llama4_local.loader import load_model
from offload.setup import OffloadOptions

PROMPT = torch.randint(0, 300, (13,), generator=torch.Generator().manual_seed(11))


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def decode(model, mode: str, n: int = 12, feed=None):
    """Prefill, then n greedy (or fed) steps in `mode`: (tokens, logits [n, V])."""
    cache = model.new_cache(PROMPT.shape[0] + n)
    logits = model(PROMPT, cache)
    step = stepper(model, cache, mode)
    tokens, out = [], []
    for i in range(n):
        tok = int(logits[-1].argmax()) if feed is None else feed[i]
        tokens.append(tok)
        logits = model(torch.tensor([tok]), cache) if step is None else step(tok).clone()
        out.append(logits)
    return tokens, torch.cat(out)


@pytest.mark.parametrize("kind", ["scout", "maverick", "multimodal"])
def test_piecewise_steps_equal_eager_offloaded_decode_float32(all_ckpts, kind):
    """Chunk boundaries (chunk 8) crossed, NoPE temperature, qk-norm; Maverick's dense layers
    between MoE ones; top-2 routing: tokens equal, logits to float32 rounding."""
    opts = OffloadOptions(slots=3, miss_policy="swap")
    model, _ = load_model(all_ckpts[kind], "float32", "cpu", offload=opts)
    want_tokens, want = decode(model, "eager")
    tokens, got = decode(model, "static")
    assert tokens == want_tokens
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("miss", ["swap", "cpu"])
def test_piecewise_int4_serves_experts_through_the_cache(scout_int4, miss):
    model, _ = load_model(scout_int4[0], "bfloat16", "cpu", offload=OffloadOptions(slots=2, miss_policy=miss))
    want_tokens, want = decode(model, "eager")
    uses = sum(s.uses for s in model.offload.stats.values())
    seen = []
    model.layers[0].feed_forward.observer = lambda layer, idx: seen.append((layer, idx.tolist()))
    tokens, got = decode(model, "static", feed=want_tokens)
    model.layers[0].feed_forward.observer = None
    assert rel_err(got, want) < 2e-2  # bf16: another order of roundings (norms, SwiGLU)
    # every step went through the expert cache, and the routing observer saw each step
    assert sum(s.uses for s in model.offload.stats.values()) > uses
    assert len([s for s in seen if s[0] == 0]) >= 12


def test_chat_turns_through_piecewise_steps_equal_eager(scout_int4, monkeypatch):
    """generate_step twice on one cache (a chat): eager prefills and piecewise steps take turns."""
    from llama4_local.generate import generate_step
    from llama4_local.sampling import Sampler, SamplingParams

    def turns(mode):
        monkeypatch.setenv("LLAMA4_LOCAL_DECODE", mode)
        opts = OffloadOptions(slots=2, miss_policy="swap")
        model, _ = load_model(scout_int4[0], "float32", "cpu", offload=opts)
        sampler = Sampler(SamplingParams(temperature=0.0), torch.device("cpu"))
        cache = model.new_cache(48)
        steps = generate_step(model, PROMPT.tolist(), sampler, cache)
        first = [next(steps) for _ in range(6)]
        steps.close()
        steps = generate_step(model, [first[-1], 5, 6, 7], sampler, cache)
        second = [next(steps) for _ in range(9)]
        steps.close()
        return first + second, cache

    want, _ = turns("eager")
    got, cache = turns("static")
    assert got == want
    assert cache.decoder is not None and cache.decoder[2] is not None


def test_auto_keeps_offloaded_models_eager(scout_int4, monkeypatch):
    monkeypatch.delenv("LLAMA4_LOCAL_DECODE", raising=False)
    model, _ = load_model(scout_int4[0], "bfloat16", "cpu", offload=OffloadOptions(slots=2))
    assert stepper(model, model.new_cache(16)) is None


@pytest.mark.cuda
@pytest.mark.parametrize("miss", ["swap", "cpu"])
def test_piecewise_graphs_on_cuda_equal_static_and_eager(scout_int4, scout_ckpt, miss):
    """The attention halves replayed from CUDA graphs per layer compute what they compute
    unreplayed, and the eager offloaded model's logits (float32, the dense checkpoint)."""

    def load():
        opts = OffloadOptions(slots=3, miss_policy=miss)
        return load_model(scout_ckpt, "float32", "cuda", offload=opts)[0]

    def run(mode, feed=None):
        model = load()
        cache = model.new_cache(PROMPT.shape[0] + 12)
        logits = model(PROMPT.cuda(), cache)
        step = stepper(model, cache, mode)
        tokens, out = [], []
        for i in range(12):
            tok = int(logits[-1].argmax()) if feed is None else feed[i]
            tokens.append(tok)
            logits = model(torch.tensor([tok], device="cuda"), cache) if step is None else step(tok).clone()
            out.append(logits.cpu())
        return tokens, torch.cat(out)

    want_tokens, want = run("eager")
    tokens, replayed = run("graph", feed=want_tokens)
    _, plain = run("static", feed=want_tokens)
    assert rel_err(replayed, plain) < 1e-6
    assert rel_err(replayed, want) < 1e-5


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_decode_queues_the_shared_expert_while_cpu_misses_compute(scout_ckpt, mode):
    """A decode step's shared expert is issued inside the manager's run, after the CPU misses
    take their inputs and before they compute: on a GPU it runs while the host computes them
    (issued before run, the inputs' copy would wait for it; after, it would wait for the CPU)."""
    model, _ = load_model(scout_ckpt, "float32", "cpu", offload=OffloadOptions(slots=1, miss_policy="cpu"))
    m, events = model.offload, []
    run, cpu_kernel = m.run, m.cpu_kernel

    def logged_run(layer, groups, overlap=None):
        events.append(("run", layer))
        return run(layer, groups, overlap)

    def logged_cpu(x, views):
        events.append(("cpu", None))
        return cpu_kernel(x, views)

    m.run, m.cpu_kernel = logged_run, logged_cpu
    for layer in model.layers:
        if layer.is_moe:
            sh = layer.feed_forward.shared_expert.gate_proj
            sh.register_forward_pre_hook(lambda _m, _x: events.append(("shared", None)))
    cache = model.new_cache(PROMPT.shape[0] + 4)
    logits = model(PROMPT, cache)
    step = stepper(model, cache, mode)
    events.clear()  # decode steps only (a prefill's misses are copied)
    for _ in range(4):
        tok = int(logits[-1].argmax())
        logits = model(torch.tensor([tok]), cache) if step is None else step(tok)
    layers = [i for i, (k, _) in enumerate(events) if k == "run"] + [len(events)]
    cpu_steps = 0
    for a, b in zip(layers, layers[1:], strict=False):
        kinds = [k for k, _ in events[a + 1 : b]]
        assert kinds.count("shared") == 1, kinds  # once per layer, inside run
        if "cpu" in kinds:
            cpu_steps += 1
            assert kinds.index("shared") < kinds.index("cpu"), kinds
    assert cpu_steps > 0

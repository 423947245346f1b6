"""The server's engine: KV caches reused by prefix give what a fresh run gives."""

import pytest
import torch

from llama4_local.engine import Engine, GenerationRequest, PrefixCache, Usage, longest_common_prefix
from llama4_local.generate import generate
from llama4_local.loader import load_model
from llama4_local.sampling import SamplingParams
from llama4_local.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def setup(all_ckpts):
    out = {}
    for name in ("scout", "maverick"):
        model, cfg = load_model(all_ckpts[name], "float32", "cpu")
        out[name] = (model, Tokenizer(all_ckpts[name]), cfg)
    return out


def run(engine, ids, n=6):
    usage = Usage(0, 0)
    req = GenerationRequest(ids, GREEDY, n, ignore_eos=True, logprobs=0)
    records = list(engine.generate(req, usage))
    return [r.token for r in records], records, usage


@pytest.mark.parametrize("name,decode", [("scout", "eager"), ("maverick", "eager"), ("scout", "static")])
def test_reuse_across_chunk_boundaries_matches_fresh(setup, name, decode, monkeypatch):
    """Chunks of 8: prompts that share a prefix ending in the block before the cache's current one.
    With static decode steps (graph_decode) too: they keep the finished block for rewinds as the
    eager cache does; the reference is always the eager forward."""
    monkeypatch.setenv("LLAMA4_LOCAL_DECODE", decode)
    model, tok, cfg = setup[name]
    engine = Engine(model, tok, set(), 256)
    base = tok.encode("The quick brown fox jumps over the lazy dog. Llama 4 Scout is a mixture of experts")
    assert cfg.attention_chunk_size == 8 and len(base) > 20
    cases = [base, base[:-1] + base[:1], base[:13] + base[5:9], base + base[2:7], base[:10]]
    cached = []
    for ids in cases:
        got, records, usage = run(engine, ids, 7)
        cached.append(usage.cached_tokens)
        monkeypatch.setenv("LLAMA4_LOCAL_DECODE", "eager")
        with torch.inference_mode():
            want = generate(model, tok, ids, GREEDY, 7, set(), ignore_eos=True)
        monkeypatch.setenv("LLAMA4_LOCAL_DECODE", decode)
        assert got == want.token_ids, (ids, usage)
        fresh = [r.logprob.logprob for r in records]
        assert all(lp <= 0 for lp in fresh)
    # The second case rewound the first's cache (which had moved on to the next block) into the
    # block before: its common prefix ends before the last block boundary the cache crossed.
    assert cached[1] == len(base) - 1 and (len(base) - 1) // 8 < (len(base) + 6) // 8
    run(engine, base)
    _, _, usage = run(engine, base[:-1] + [base[0]])
    assert usage.cached_tokens == len(base) - 1


def test_prefix_cache_bounds_and_picks_the_longest_match(setup):
    model, tok, _ = setup["scout"]
    pc = PrefixCache(lambda: model.new_cache(64, keep_previous=True), entries=2)
    caches = []
    for ids in ([1, 2, 3, 4], [1, 2, 9], [5, 6, 7]):
        c = model.new_cache(64, keep_previous=True)
        with torch.inference_mode():
            model(torch.tensor(ids), c)
        pc.give(c, ids)
        caches.append(c)
    assert len(pc._idle) == 2  # the oldest went
    cache, n = pc.take([1, 2, 9, 9])
    assert cache is caches[1] and n == 3
    cache, n = pc.take([1, 2, 3, 4])  # [1, 2, 3, 4] was evicted: a fresh cache
    assert n == 0 and cache not in caches
    assert longest_common_prefix([1, (2, "a")], [1, (2, "b")]) == 1

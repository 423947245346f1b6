"""Logits equal transformers' (the oracle) on three tiny configs, float32."""

import pytest
import torch

from llama4_local.loader import load_model
from quant import cpu_kernel
from tests.factory import load_reference

KINDS = ["scout", "maverick", "multimodal"]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def models(all_ckpts):
    return {k: (load_model(p, "float32", "cpu")[0], load_reference(p)) for k, p in all_ckpts.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(models, kind):
    ours, ref = models[kind]
    torch.manual_seed(1)
    # 60 tokens: seven chunk boundaries (chunk 8) and past floor_scale (16) for temperature tuning.
    ids = torch.randint(0, ours.cfg.vocab_size, (60,))
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0].float()
    got = ours(ids, ours.new_cache(60), last_only=False)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_decode_equals_full_forward(models, kind):
    ours, _ = models[kind]
    torch.manual_seed(2)
    n = 45
    ids = torch.randint(0, ours.cfg.vocab_size, (n,))
    full = ours(ids, ours.new_cache(n), last_only=False)
    cache = ours.new_cache(n)
    steps = [ours(ids[i : i + 1], cache) for i in range(n)]
    assert rel_err(torch.cat(steps), full) < 1e-5
    # Prefill in uneven pieces that start and end inside chunks and cross boundaries.
    cache = ours.new_cache(n)
    pieces, s = [], 0
    for size in (5, 13, 1, 9, 17):
        pieces.append(ours(ids[s : s + size], cache, last_only=False))
        s += size
    assert s == n
    assert rel_err(torch.cat(pieces), full) < 1e-5


@pytest.mark.parametrize("kind", ["scout", "maverick"])
def test_queries_a_few_at_a_time_past_the_score_bound(models, kind, monkeypatch):
    """Past SCORE_KEYS keys a prefill piece's queries attend a few at a time (bounding the scores
    a backend materializes): the same logits as in one call, still the oracle's, with chunk
    boundaries and NoPE layers in the pieces."""
    from llama4_local import model as model_mod

    ours, ref = models[kind]
    torch.manual_seed(5)
    ids = torch.randint(0, ours.cfg.vocab_size, (60,))
    pieces = (23, 37)  # the second piece's NoPE layers see 60 keys: past the bound below

    def run():
        cache, out, s = ours.new_cache(60), [], 0
        for size in pieces:
            out.append(ours(ids[s : s + size], cache, last_only=False))
            s += size
        return torch.cat(out)

    whole = run()
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(model_mod, "SCORE_KEYS", 16)
    monkeypatch.setattr(
        model_mod.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(a[0].shape[2]) or real(*a, **k)
    )
    split = run()
    assert calls and max(calls) <= 16  # split: 16 + 7 queries, then at most 37 * 16 // 60 = 9 a call
    assert rel_err(split, whole) < 1e-6
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0].float()
    assert rel_err(split, want) < 1e-4


def test_kv_repeated_per_query_head_is_sdpa_with_grouped_heads(models, monkeypatch):
    """LLAMA4_LOCAL_SDPA_EXPAND=1 (K/V repeated for each query head, for CUDA's memory-efficient
    kernel): the same prefill logits as SDPA's grouped heads."""
    ours, _ = models["scout"]
    assert ours.cfg.num_kv_heads != ours.cfg.num_heads
    ids = torch.randint(0, ours.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(8))
    grouped = ours(ids, ours.new_cache(40), last_only=False)
    monkeypatch.setenv("LLAMA4_LOCAL_SDPA_EXPAND", "1")
    assert rel_err(ours(ids, ours.new_cache(40), last_only=False), grouped) < 1e-6


def test_chunked_cache_is_bounded(models):
    ours, _ = models["scout"]
    cache = ours.new_cache(200)
    ours(torch.zeros(100, dtype=torch.long), cache)
    for _ in range(20):
        ours(torch.zeros(1, dtype=torch.long), cache)
    chunk = ours.cfg.attention_chunk_size
    for i, kv in enumerate(cache.layers):
        if ours.cfg.chunked_layers[i]:
            assert kv.buf.capacity <= chunk
        else:
            assert kv.length == 120


@pytest.mark.parametrize("kind", ["scout", "multimodal"])
def test_bfloat16_as_close_to_float32_as_transformers_bfloat16(all_ckpts, models, kind):
    # In bfloat16 neither implementation is exact; ours must be no further from the float32
    # result than transformers' own bfloat16 run, for prefill (upcast GEMMs) and decode.
    _, ref32 = models[kind]
    ours, _ = load_model(all_ckpts[kind], "bfloat16", "cpu")
    ref16 = load_reference(all_ckpts[kind], torch.bfloat16)
    ids = torch.randint(0, ours.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = ref32(input_ids=ids[None]).logits[0]
        want = ref16(input_ids=ids[None]).logits[0].float()
    cache = ours.new_cache(40)
    got = torch.cat([ours(ids[:30], cache, last_only=False)] + [ours(ids[i : i + 1], cache) for i in range(30, 40)])
    assert rel_err(got, want) < 5e-2  # two bf16 runs differ by a few percent on random weights
    assert rel_err(got, exact) < 1.5 * rel_err(want, exact) + 1e-3


def test_top2_bfloat16_sums_routed_experts_as_transformers(all_ckpts):
    """With k > 1 experts per token, the k routed outputs are summed (float32, rounded once) and
    then added to the shared expert's, as the reference does: adding each to the running sum
    rounded k times and put bf16 logits 1.1-2.7% from transformers' bf16 on every prompt (3.5% on
    an H200). Where the CPU multiplies bf16 natively both sides run the same GEMM and agree to
    0.0; where it does not (AVX2: our linears widen to float32, torch's bf16 GEMM sums in another
    order) two prompts agree to 1e-6 and 3e-4, and one flips a bf16 rounding early enough to end
    5.4e-3 apart (Zen 3). So the median prompt is held to 2e-3 and every prompt under 1e-2."""
    ours, _ = load_model(all_ckpts["multimodal"], "bfloat16", "cpu")
    ref16 = load_reference(all_ckpts["multimodal"], torch.bfloat16)
    assert ours.cfg.top_k == 2
    errs = []
    for seed in range(3):
        ids = torch.randint(0, ours.cfg.vocab_size, (60,), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = ref16(input_ids=ids[None]).logits[0]
        errs.append(rel_err(ours(ids, ours.new_cache(60), last_only=False), want))
    assert sorted(errs)[1] < 2e-3 and max(errs) < 1e-2, errs


@pytest.mark.parametrize("keys", [1, 37, 300])
def test_one_query_attention_is_sdpa_with_gqa(keys):
    """The decode step's attention (one query, grouped KV heads) against torch's SDPA: float32
    to rounding; bf16 within bf16's own rounding of the scores and probabilities."""
    import torch.nn.functional as F

    from llama4_local.model import one_query_attention

    g = torch.Generator().manual_seed(keys)
    q, k, v = (torch.randn(n, s, 16, generator=g) for n, s in ((8, 1), (2, keys), (2, keys)))
    want = F.scaled_dot_product_attention(q[None], k[None], v[None], enable_gqa=True)[0]
    torch.testing.assert_close(one_query_attention(q, k, v), want, rtol=1e-5, atol=1e-6)
    got = one_query_attention(*(a.bfloat16() for a in (q, k, v)))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.03, atol=0.02)


@pytest.mark.skipif(not cpu_kernel.available(), reason="needs the built CPU kernel")
@pytest.mark.parametrize("keys", [1, 37, 300, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,hd", [(10, 32), (16, 128)])
@pytest.mark.parametrize("parts", [0, 3])
def test_attention_kernel_is_the_eager_path(keys, dtype, heads, hd, parts):
    """quant/attn_kernel.py (what one_query_attention runs on the CPU) against the eager path it
    replaces (two bmm, float32 softmax, roundings in the inputs' dtype), on views of a larger
    cache as decode passes them: float32 to rounding, bf16 equal but for a rare last-bit flip.
    Scout's 5 query heads per KV head, and 8 (the kernel takes 6 at a time); odd key counts
    (its keys go 2 at a time) and several blocks of values; each KV head's keys in one range
    (as here, two threads for two KV heads) or cut into three (threads beyond the KV heads)."""
    from llama4_local import model

    g = torch.Generator().manual_seed(keys)
    q = torch.randn(heads, 1, hd, generator=g).to(dtype)
    k, v = (torch.randn(2, 1100, hd, generator=g).to(dtype)[:, :keys] for _ in range(2))
    assert model._attention_kernel(q, k, v)
    got = cpu_kernel.attend_one(q, k, v, parts)
    scores = torch.bmm(q.reshape(2, heads // 2, hd), k.transpose(1, 2)) * hd**-0.5
    want = torch.bmm(torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype), v).reshape(heads, 1, hd)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert (got == want).float().mean() > 0.98
        torch.testing.assert_close(got.float(), want.float(), rtol=0.01, atol=0.01)
    nan = k.clone()
    nan[1, 0, 3] = float("nan")
    out = cpu_kernel.attend_one(q, nan, v, parts)
    half = heads // 2
    assert out[half:].isnan().all() and not out[:half].isnan().any()  # only the heads reading KV head 1

"""Sampling and stop handling."""

import pytest
import torch

from llama4_local.errors import UserError
from llama4_local.generate import _StopMatcher, generate
from llama4_local.loader import load_model
from llama4_local.sampling import Sampler, SamplingParams, read_generation_config
from llama4_local.tokenizer import Tokenizer


def sample_many(params, logits, n=400):
    s = Sampler(params, torch.device("cpu"))
    return {s(logits, None) for _ in range(n)}


def test_greedy_and_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])
    assert sample_many(SamplingParams(temperature=0), logits, 5) == {1}
    assert sample_many(SamplingParams(temperature=1, top_k=2, top_p=1, seed=0), logits) == {1, 2}
    probs = logits.softmax(-1)  # [0.086, 0.63, 0.23, 0.05, 0.007]
    assert sample_many(SamplingParams(temperature=1, top_p=0.7, seed=0), logits) == {1, 2}
    assert sample_many(SamplingParams(temperature=1, top_p=0.5, seed=0), logits) == {1}
    assert sample_many(SamplingParams(temperature=1, top_p=1, min_p=0.3, seed=0), logits) == {1, 2}
    assert probs[2] / probs[1] > 0.3 > probs[0] / probs[1]


def reference_top_p(logits, top_p):
    """transformers' TopPLogitsWarper: sort ascending, drop the tail whose mass is <= 1 - top_p."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum <= 1 - top_p
    drop[-1] = False
    return set(sorted_idx[~drop].tolist())


@pytest.mark.parametrize("first", [256, 4])  # 4: the candidates grow, then a sort takes over
def test_top_p_keeps_what_the_full_sort_keeps(monkeypatch, first):
    from llama4_local import sampling

    monkeypatch.setattr(sampling, "TOP_P_FIRST", first)
    g = torch.Generator().manual_seed(3)
    checked = 0
    for v in (384, 5000):
        for scale in (0.05, 1.0, 5.0, 20.0):
            for top_p in (0.3, 0.9, 0.99):
                logits = torch.randn(v, generator=g) * scale
                logits[torch.randperm(v, generator=g)[: v // 10]] = float("-inf")  # a grammar's mask
                got = sampling.top_p_keep(logits, top_p)
                assert got.unique().numel() == got.numel()
                want = reference_top_p(logits, top_p)
                if set(got.tolist()) != want:  # only where the set's edge sits at top_p within rounding
                    probs = logits.softmax(-1)
                    edge = min(want ^ set(got.tolist()), key=lambda i: -probs[i])
                    above = probs[probs > probs[edge]].sum()
                    assert abs(float(above) - top_p) < 1e-5 or abs(float(above + probs[edge]) - top_p) < 1e-5
                checked += 1
                assert float(logits[got].softmax(-1).sum()) == pytest.approx(1.0)
    assert checked == 24


def test_top_p_of_a_flat_vocabulary_by_buckets():
    """Past an eighth of the vocabulary the set comes from buckets of the probabilities' bits:
    the full sort's set on a flat distribution (most of the vocabulary kept), and on equal
    probabilities (one bucket holds them all) as many tokens as the sort keeps."""
    from llama4_local import sampling

    g = torch.Generator().manual_seed(4)
    for scale, top_p in ((0.3, 0.9), (1.0, 0.5), (0.01, 0.99)):
        logits = torch.randn(50000, generator=g) * scale
        got = sampling.top_p_by_buckets(logits.softmax(-1), top_p)
        assert got.unique().numel() == got.numel() and len(got) > 5000
        want = reference_top_p(logits, top_p)
        assert len(want ^ set(got.tolist())) <= 2, (scale, top_p)  # at most the edge, within rounding
    flat = torch.zeros(1000)
    assert len(sampling.top_p_keep(flat, 0.5)) == len(reference_top_p(flat, 0.5)) == 500
    bad = torch.zeros(1000)
    bad[7] = -float("nan")  # a NaN's sign bit would give a negative bucket: such logits are sorted
    assert len(sampling.top_p_keep(bad, 0.5)) >= 1


def test_draws_follow_the_filtered_distribution():
    """top-k (ties with the k-th kept) then top-p then the draw among what is left, mapped back
    to token ids: frequencies match the renormalized probabilities."""
    logits = torch.tensor([0.0, 2.0, -9.0, 1.0, 1.0, 3.0, -1.0, 0.5])
    # top-k 3 keeps 3.0, 2.0 and both 1.0s (tokens 5, 1, 3, 4): probabilities 0.61, 0.22, 0.08,
    # 0.08, whose first three hold 0.92: top-p 0.95 keeps all four, 0.8 the first two
    kept = torch.tensor([5, 1, 3, 4])
    n = 6000
    s = Sampler(SamplingParams(temperature=1, top_k=3, top_p=0.95, seed=1), torch.device("cpu"))
    counts = torch.bincount(torch.tensor([s(logits, None) for _ in range(n)]), minlength=8).float() / n
    want = torch.zeros(8)
    want[kept] = logits[kept].softmax(-1)
    assert torch.allclose(counts, want, atol=0.02)
    assert set(torch.nonzero(counts).squeeze(1).tolist()) == set(kept.tolist())
    assert sample_many(SamplingParams(temperature=1, top_k=3, top_p=0.8, seed=1), logits) == {5, 1}


def test_draws_over_a_large_vocabulary():
    """Past DRAW_BY_CDF candidates (top-p 1 over Scout's vocabulary) a draw inverts the cumulative
    sum: frequencies follow the probabilities, tokens without probability never come, a seed
    repeats its draws."""
    from llama4_local.sampling import draw

    v = 20000
    logits = torch.full((v,), float("-inf"))
    logits[[3, 7000, 19999]] = torch.tensor([1.0, 2.0, 0.5])
    logits[100:200] = -2.0
    params = SamplingParams(temperature=1, top_p=1.0, seed=4)
    s = Sampler(params, torch.device("cpu"))
    n = 4000
    got = torch.tensor([s(logits, None) for _ in range(n)])
    counts = torch.bincount(got, minlength=v).float() / n
    assert torch.allclose(counts, logits.softmax(-1), atol=0.025)
    assert set(got.tolist()) <= {3, 7000, 19999} | set(range(100, 200))
    again = Sampler(params, torch.device("cpu"))
    assert [again(logits, None) for _ in range(50)] == got[:50].tolist()
    gen = torch.Generator().manual_seed(0)
    last = torch.zeros(v)
    last[-1] = 1.0
    assert all(draw(last, gen) == v - 1 for _ in range(20))


def test_repetition_penalty():
    logits = torch.tensor([2.0, 1.9, -1.0])
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), torch.device("cpu"))
    assert s(logits, torch.tensor([0])) == 1  # 2.0 / 1.5 < 1.9
    assert s(logits, torch.tensor([2])) == 0


def test_invalid_params():
    with pytest.raises(UserError):
        SamplingParams(top_k=-1).validate()
    with pytest.raises(UserError):
        SamplingParams(min_p=1.0).validate()


def test_stop_matcher_holds_back_partial_matches():
    m = _StopMatcher(["</end>", "STOP"])
    out = []
    for piece in ["Hello <", "/en", "x> and ST", "OP here"]:
        text, hit = m.push(piece)
        out.append(text)
        if hit:
            break
    assert hit
    assert "".join(out) == "Hello </enx> and "


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.3, "top_p": 0.5, "eos_token_id": [5, 6]}')
    d = read_generation_config(tmp_path)
    assert d.sampling.temperature == 0.3 and d.sampling.top_p == 0.5
    assert d.eos_token_ids == (5, 6)
    (tmp_path / "generation_config.json").write_text('{"do_sample": false}')
    assert read_generation_config(tmp_path).sampling.temperature == 0


@pytest.fixture(scope="module")
def scout(scout_ckpt):
    return load_model(scout_ckpt, "float32", "cpu")[0], Tokenizer(scout_ckpt)


def test_stops_on_eos_and_stop_string(scout):
    model, tok = scout
    prompt = tok.encode("The quick brown fox")
    free = generate(model, tok, prompt, SamplingParams(temperature=0), 30, eos_ids=set(), ignore_eos=True)
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    # Make the 5th generated token an eos: generation stops there, the eos is not printed.
    eos = free.token_ids[4]
    r = generate(model, tok, prompt, SamplingParams(temperature=0), 30, eos_ids={eos})
    assert r.finish_reason == "stop" and r.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]
    # A stop string taken from the free text: the reply ends right before it.
    text = free.text
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].strip())
    r = generate(model, tok, prompt, SamplingParams(temperature=0), 30, eos_ids=set(), stop=[stop])
    assert r.finish_reason == "stop"
    assert r.text == text[: text.index(stop)]

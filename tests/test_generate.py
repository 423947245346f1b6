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

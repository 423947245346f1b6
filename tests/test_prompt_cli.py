"""The `prompt` command end to end, against transformers' greedy generate."""

import json

import torch

from tests.cli_util import greedy_json, run_cli
from tests.factory import load_reference

PROMPT = "The quick brown fox jumps over the lazy dog. Llama 4 Scout"


def test_raw_greedy_matches_transformers_generate(scout_ckpt):
    from transformers import AutoTokenizer, GenerationConfig

    out = greedy_json(PROMPT, "--model", scout_ckpt, "--raw", "--max-tokens", "64")
    assert set(out) == {"text", "token_ids", "prompt_tokens", "finish_reason", "stats"}
    assert out["finish_reason"] == "length"

    tok = AutoTokenizer.from_pretrained(scout_ckpt)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert out["prompt_tokens"] == ids.shape[1]
    ref = load_reference(scout_ckpt)
    gen = GenerationConfig(do_sample=False, max_new_tokens=64, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids, generation_config=gen)[0, ids.shape[1] :].tolist()
    assert len(want) == 64
    assert out["token_ids"] == want
    assert out["text"] == tok.decode(want, skip_special_tokens=True)


def test_streams_text_and_prints_stats(scout_ckpt):
    r = run_cli("prompt", "Hello", "-m", scout_ckpt, "--dtype", "float32", "-n", "12", "--seed", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "prompt" in lines[0] and "decode" in lines[0] and "tok/s" in lines[0]


def test_stdin_prompt_and_system(scout_ckpt):
    r = run_cli(
        "prompt",
        "-",
        "-m",
        scout_ckpt,
        "--system",
        "Be brief.",
        "--json",
        "-n",
        "4",
        "--temperature",
        "0",
        stdin="What is a llama?",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    from llama4_local.tokenizer import Tokenizer

    tok = Tokenizer(scout_ckpt)
    want = tok.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a llama?"}]
    )
    assert out["prompt_tokens"] == len(want)
    assert len(out["token_ids"]) == 4


def test_same_seed_same_sample(scout_ckpt):
    args = ("prompt", "Hi", "-m", scout_ckpt, "--json", "-n", "10", "--temperature", "1.5", "--top-p", "1")
    a = json.loads(run_cli(*args, "--seed", "7").stdout)["token_ids"]
    b = json.loads(run_cli(*args, "--seed", "7").stdout)["token_ids"]
    c = json.loads(run_cli(*args, "--seed", "8").stdout)["token_ids"]
    assert a == b
    assert a != c

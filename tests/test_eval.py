"""`eval`: perplexity against transformers' loss, KL divergence and top-1 agreement."""

import json
import math

import pytest
import torch

from llama4_local.evaluate import evaluate, windows
from llama4_local.loader import load_model
from llama4_local.tokenizer import Tokenizer
from quant.quantize import QuantizeOptions, quantize_checkpoint
from tests.cli_util import run_cli
from tests.factory import CORPUS, load_reference

TEXT = "\n".join(CORPUS * 3)


def test_windows_start_with_bos_and_cover_the_text():
    ids = list(range(10, 30))
    ws = list(windows(ids, 8, bos=1))
    assert all(w[0] == 1 and len(w) <= 8 for w in ws)
    assert [t for w in ws for t in w[1:]] == ids


def test_perplexity_matches_transformers_loss(scout_ckpt):
    tok = Tokenizer(scout_ckpt)
    ids = tok.encode(TEXT, add_special_tokens=False)[:63]
    model, _ = load_model(scout_ckpt, "float32", "cpu")
    res = evaluate(model, ids, ctx=64, bos=tok.bos_id)
    assert res.windows == 1 and res.tokens == 63
    ref = load_reference(scout_ckpt)
    x = torch.tensor([[tok.bos_id, *ids]])
    with torch.no_grad():
        loss = ref(input_ids=x, labels=x).loss.item()
    assert math.isclose(res.perplexity, math.exp(loss), rel_tol=1e-4)


def test_model_against_itself(scout_ckpt):
    tok = Tokenizer(scout_ckpt)
    ids = tok.encode(TEXT, add_special_tokens=False)
    model, _ = load_model(scout_ckpt, "float32", "cpu")
    res = evaluate(model, ids, ctx=32, bos=tok.bos_id, reference=model, max_windows=4)
    assert res.windows == 4 and res.tokens == 4 * 31
    assert res.kl_mean == 0 and res.kl_max == 0 and res.top1_agreement == 1.0
    assert res.perplexity == res.reference_perplexity


def test_quantized_against_original_cli(tmp_path, scout_ckpt):
    q = tmp_path / "q"
    quantize_checkpoint(scout_ckpt, q, QuantizeOptions(group_size=32))
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    r = run_cli(
        "eval", "-m", q, "--reference", scout_ckpt, "--text", text, "--ctx", "48", "--json", "--dtype", "float32"
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert 0 < res["kl_mean"] < 0.5
    assert res["kl_median"] <= res["kl_p99"] <= res["kl_max"]
    assert 0 < res["top1_agreement"] <= 1


@pytest.mark.parametrize("content, words", [(None, "does not exist"), (b"\xff\xfe\x00bad", "UTF-8")])
def test_eval_bad_text(tmp_path, scout_ckpt, content, words):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    r = run_cli("eval", "-m", scout_ckpt, "--text", path)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr

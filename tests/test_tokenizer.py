"""Tokenizer, chat template and streaming detokenization against transformers' tokenizer."""

import pytest

from llama4_local.tokenizer import StreamingDetokenizer, Tokenizer
from tests.factory import CORPUS

CONVERSATION = [
    {"role": "system", "content": "  You are a helpful llama.  "},
    {"role": "user", "content": "What is a mixture of experts?"},
    {"role": "assistant", "content": "A model whose layers route each token to a few experts."},
    {"role": "user", "content": "And Scout? 🦙 日本語"},
    {"role": "assistant", "content": "Sixteen experts, one shared."},
    {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
]


@pytest.fixture(scope="module")
def toks(scout_ckpt):
    from transformers import AutoTokenizer

    return Tokenizer(scout_ckpt), AutoTokenizer.from_pretrained(scout_ckpt)


@pytest.mark.parametrize("n_messages", [2, 4, 6])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_matches_transformers(toks, n_messages, gen_prompt):
    ours, ref = toks
    msgs = CONVERSATION[:n_messages]
    want = ref.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=True, return_dict=False)
    got = ours.encode_chat(msgs, add_generation_prompt=gen_prompt)
    assert got == list(want)
    assert got.count(ours.bos_id) == 1 and got[0] == ours.bos_id  # no double BOS


def test_chat_without_system(toks):
    ours, ref = toks
    msgs = CONVERSATION[1:4]
    want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.encode_chat(msgs) == list(want)


def test_raw_encoding_matches_transformers(toks):
    ours, ref = toks
    for text in CORPUS:
        assert ours.encode(text) == ref(text).input_ids
        assert ours.encode(text)[0] == ours.bos_id


def test_chat_template_file_wins(tmp_path, scout_ckpt):
    import shutil

    d = tmp_path / "c"
    shutil.copytree(scout_ckpt, d)
    (d / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}")
    tok = Tokenizer(d)
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "<|begin_of_text|>[x]"


def test_template_is_sandboxed(tmp_path, scout_ckpt):
    import shutil

    from llama4_local.errors import UserError

    d = tmp_path / "c"
    shutil.copytree(scout_ckpt, d)
    (d / "chat_template.jinja").write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(UserError):
        Tokenizer(d).render_chat([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("text", CORPUS + ["🦙🦙🦙 ∑∞ naïve 日本語 \n\t end"])
def test_streaming_detokenizer_never_breaks_characters(toks, text):
    ours, _ = toks
    ids = ours.encode(text, add_special_tokens=False)
    detok = StreamingDetokenizer(ours)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == ours.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_streaming_detokenizer_byte_tokens(toks):
    # One token per byte: a 4-byte emoji arrives in four pieces and must come out whole, once.
    ours, _ = toks
    ids = [ours.token_id(ch) for ch in "ðŁ¦Ļ"]  # byte-level symbols of U+1F999 (llama)
    assert None not in ids
    detok = StreamingDetokenizer(ours)
    pieces = [detok.add(i) for i in ids]
    assert pieces[:3] == ["", "", ""]
    assert pieces[3] == "🦙"

"""`chat`: the conversation state (KV cache reuse, overflow, save/load) and the terminal front end."""

import json
import sys

import pytest
import torch

from llama4_local.chat import ChatSession
from llama4_local.engine import Engine
from llama4_local.errors import UserError
from llama4_local.loader import load_model
from llama4_local.sampling import SamplingParams
from llama4_local.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def loaded(scout_ckpt):
    model, cfg = load_model(scout_ckpt, "float32", "cpu")
    return model, cfg, Tokenizer(scout_ckpt)


def session(loaded, context=512, max_tokens=6, system=None):
    model, cfg, tok = loaded
    return ChatSession(Engine(model, tok, set(cfg.eos_token_ids), context, cache_entries=1), GREEDY, max_tokens, system)


def greedy_continuation(model, ids, n):
    cache = model.new_cache(len(ids) + n)
    logits = model(torch.tensor(ids), cache)
    out = []
    for _ in range(n):
        t = int(logits[-1].argmax())
        out.append(t)
        logits = model(torch.tensor([t]), cache)
    return out


def test_second_turn_prefills_only_its_new_tokens(loaded):
    model, _, tok = loaded
    s = session(loaded, system="Be brief.")
    first = s.reply("Hello there")
    full1 = tok.encode_chat(s.all_messages()[:-1])
    assert first.prefilled == len(full1)
    before = list(s.tokens)
    second = s.reply("And what else?")
    full2 = tok.encode_chat(s.all_messages()[:-1])
    assert second.prefilled < len(full2) // 2  # not the whole conversation again
    # The text the cached ids stand for: the first prompt and the reply (and its end token, if any).
    known = tok.render_chat(s.all_messages()[:2]) + first.text
    if first.finish_reason == "stop":
        known += tok.decode(first.token_ids[-1:], skip_special_tokens=False)
    new_text = tok.render_chat(s.all_messages()[:-1])[len(known) :]
    assert second.prefilled == len(first.token_ids[-1:]) + len(tok.encode(new_text, add_special_tokens=False))
    # What the reused cache produced equals a fresh run over the same token history.
    history = before + tok.encode(new_text, add_special_tokens=False)
    assert second.token_ids == greedy_continuation(model, history, len(second.token_ids))


def test_overflow_drops_oldest_turns_keeps_system(loaded):
    s = session(loaded, context=90, max_tokens=6, system="SYS")
    dropped = 0
    for i in range(6):
        r = s.reply(f"message number {i}")
        dropped += r.dropped_turns
        assert s.context_used() <= s.context
    assert dropped > 0
    assert s.all_messages()[0] == {"role": "system", "content": "SYS"}
    assert s.messages[-2]["content"] == "message number 5"
    with pytest.raises(UserError, match="does not fit the context"):
        s.reply("word " * 200)


def test_save_load_and_set(loaded, tmp_path):
    s = session(loaded, system="SYS")
    s.reply("one")
    s.set("temperature", "0.5")
    s.set("max_tokens", "9")
    s.save(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["system"] == "SYS" and len(data["messages"]) == 2 and data["settings"]["temperature"] == 0.5
    t = session(loaded)
    t.load(tmp_path / "c.json")
    assert t.messages == s.messages and t.system == "SYS" and t.max_tokens == 9 and t.params.temperature == 0.5
    r = t.reply("two")  # a loaded conversation is prefilled once, whole
    assert r.prefilled == len(t.tokenizer.encode_chat(t.all_messages()[:-1]))
    for bad in ("temperature -1", "top_k x", "colour 3", "max_tokens 0"):
        with pytest.raises(UserError):
            t.set(*bad.split())
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "wizard"}]}')
    with pytest.raises(UserError, match="not a saved conversation"):
        t.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="does not exist"):
        t.load(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def endless_ckpt(scout_ckpt, tmp_path_factory):
    """The Scout-like checkpoint with its end tokens' lm_head rows zeroed: greedy never ends a reply."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("endless")
    for f in scout_ckpt.iterdir():
        shutil.copy(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    tensors = load_file(out / "model.safetensors")
    for i in cfg["eos_token_id"]:
        tensors["lm_head.weight"][i] = 0
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _default_sigint():
    """Give the chat process Ctrl-C back: a shell that starts the tests in the background (no job
    control) ignores SIGINT, and children inherit that, so Ctrl-C would never reach the chat."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_chat_in_a_pseudo_terminal(endless_ckpt, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "cli", "chat", "-m", str(endless_ckpt), "--device", "cpu", "--dtype", "float32", "-n", "8"],
        encoding="utf-8",
        codec_errors="replace",
        timeout=120,
        env={"LLAMA4_LOCAL_HISTORY": str(tmp_path / "history"), "PATH": "/usr/bin:/bin", "TERM": "dumb"},
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]),
        preexec_fn=_default_sigint,
    )
    prompt = ">>> "
    child.expect(prompt)
    child.sendline("/help")
    child.expect("/save FILE")
    child.sendline("/system You are terse.")
    child.expect("system message set")
    child.sendline("/set temperature 0")
    child.expect("temperature = 0")
    child.sendline("Hello!")
    child.expect(r"\[stopped at max_tokens 8\]|" + prompt)  # the reply streamed, then the prompt
    child.expect(prompt)
    child.sendline("/stats")
    child.expect(r"context: \d+ of \d+ tokens, 2 messages")
    child.send("\x1b[A\r")  # up arrow: readline recalls /stats from the history
    child.expect(r"context: \d+ of \d+ tokens, 2 messages")
    child.sendline(f"/save {tmp_path / 'conv.json'}")
    child.expect("saved 2 messages")
    child.sendline("/reset")
    child.expect("conversation reset")
    child.sendline(f"/load {tmp_path / 'conv.json'}")
    child.expect("loaded 2 messages")
    child.sendline("/set max_tokens 3500")
    child.expect("max_tokens = 3500")
    child.sendline("Tell me a very long story")
    child.expect("story")  # the echo; the reply streams after it
    import time

    time.sleep(0.5)  # well before 3500 tokens end, even on a fast machine with this tiny model
    child.sendintr()
    child.expect(r"\[interrupted\]")
    child.expect(prompt)
    child.sendline("/set max_tokens 4")
    child.sendline("Go on")
    child.expect(r"stopped at max_tokens 4")
    child.sendline("/stats")
    child.expect(r"6 messages")  # the interrupted reply was kept
    child.sendline("/nonsense")
    child.expect("unknown command /nonsense")
    child.sendline('"""')
    child.sendline("line one")
    child.sendline("line two")
    child.sendline('"""')
    child.expect(r"stopped at max_tokens 4")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "conv.json").read_text())
    assert saved["system"] == "You are terse." and saved["messages"][0]["content"] == "Hello!"


def test_chat_ctrl_c_at_empty_prompt_exits_cleanly(scout_ckpt):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "cli", "chat", "-m", str(scout_ckpt), "--device", "cpu"],
        encoding="utf-8",
        timeout=120,
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]),
        preexec_fn=_default_sigint,
    )
    child.expect(">>> ")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_bad_input(tmp_path, scout_ckpt):
    from tests.cli_util import run_cli
    from tests.test_bad_input import assert_user_error

    assert_user_error(run_cli("chat", "-m", tmp_path / "nope"), "does not exist")
    assert_user_error(run_cli("chat", "-m", scout_ckpt, "--context", "4"), "--context")
    cfg = json.loads((scout_ckpt / "config.json").read_text())
    limit = cfg.get("text_config", cfg)["max_position_embeddings"]
    assert_user_error(run_cli("chat", "-m", scout_ckpt, "--context", str(limit + 1)), "--context", f"at most {limit}")
    assert_user_error(run_cli("chat", "-m", scout_ckpt, "--temperature", "-2"), "temperature")

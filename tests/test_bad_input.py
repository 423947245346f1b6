"""Every input a user can get wrong: one line on stderr, exit 2, no traceback."""

import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from tests.cli_util import error_lines, run_cli


def assert_user_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = error_lines(r)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert r.stdout == ""


def prompt(path, *extra):
    return run_cli("prompt", "hi", "--model", path, "--device", "cpu", "-n", "2", *extra)


@pytest.fixture
def broken(tmp_path, maverick_ckpt):
    """A fresh copy of the sharded checkpoint to break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(maverick_ckpt, dst)
    return dst


def first_shard(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def test_missing_path(tmp_path):
    assert_user_error(prompt(tmp_path / "nope"), "does not exist")


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    assert_user_error(prompt(f), "is a file")


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    assert_user_error(prompt(tmp_path), "tokenizer.json")


def test_no_config(broken):
    (broken / "config.json").unlink()
    assert_user_error(prompt(broken), "config.json")


def test_no_weights(broken):
    for shard in first_shard(broken):
        (broken / shard).unlink()
    (broken / "model.safetensors.index.json").unlink()
    assert_user_error(prompt(broken), "model.safetensors")


def test_non_llama4_config(broken):
    (broken / "config.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 64}))
    assert_user_error(prompt(broken), "mistral", "Llama 4")


def test_broken_json(broken):
    (broken / "config.json").write_text("{not json")
    assert_user_error(prompt(broken), "config.json", "not valid JSON")


def test_index_names_missing_shard(broken):
    shard = first_shard(broken)[1]
    (broken / shard).unlink()
    assert_user_error(prompt(broken), shard, "missing")


def test_truncated_shard(broken):
    shard = broken / first_shard(broken)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert_user_error(prompt(broken), shard.name)


def test_tensor_with_wrong_shape(broken):
    shard = broken / first_shard(broken)[0]
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    name = next(k for k in tensors if tensors[k].dim() == 2)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(shard), metadata=meta)
    assert_user_error(prompt(broken), name, shard.name, "shape")


def test_context_overflow(scout_ckpt):
    assert_user_error(run_cli("prompt", "hi", "-m", scout_ckpt, "-n", "100000"), "context")
    # a context past the model's positions was cut to them without a word
    assert_user_error(run_cli("prompt", "hi", "-m", scout_ckpt, "--context", "10000000"), "--context", "positions")


@pytest.mark.parametrize(
    "opt, value, words",
    [
        ("--temperature", "-1", "--temperature"),
        ("--top-p", "0", "--top-p"),
        ("--dtype", "int3", "--dtype"),
        ("--device", "tpu", "--device"),
        ("--prefill-chunk", "0", "--prefill-chunk"),
        ("--max-tokens", "-3", "--max-tokens"),
        ("--threads", "0", "--threads"),
    ],
)
def test_bad_options(scout_ckpt, opt, value, words):
    assert_user_error(run_cli("prompt", "hi", "-m", scout_ckpt, opt, value), words)


@pytest.mark.parametrize(
    "opt, value, words",
    [
        # getaddrinfo took 99999 as 99999 - 65536 and the server listened on another port than asked
        ("--port", "99999", "--port"),
        ("--port", "-1", "--port"),
        ("--prompt-cache", "-1", "--prompt-cache"),
        ("--api-key", "", "--api-key"),  # would have let in 'Authorization: Bearer ' with no key
        ("--host", "999.1.1.1", "--host"),  # the no-key warning came first: two lines
    ],
)
def test_bad_serve_options(scout_ckpt, opt, value, words):
    assert_user_error(run_cli("serve", "-m", scout_ckpt, "--port", "0", opt, value, timeout=60), words)


def test_raw_needed_without_template(broken):
    cfg = json.loads((broken / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (broken / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert_user_error(prompt(broken), "--raw")


@pytest.mark.parametrize("command", ["prompt", "chat", "quantize", "eval", "info", "bench"])
def test_help_teaches_by_example_without_importing_torch(command):
    """--help for every command: examples included, and no torch import (so it answers at once)."""
    import subprocess
    import sys

    code = (
        "import sys, cli\n"
        "from typer.testing import CliRunner\n"
        f"r = CliRunner().invoke(cli.app, ['{command}', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'Examples' in r.output and 'llama4-local' in r.output, r.output\n"
        "assert 'torch' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_usage_errors_are_one_line(scout_ckpt):
    """A missing, malformed or unknown option or command: one line naming it and where the
    options are listed, exit 2 (Typer's own rendering was a boxed panel under a usage line); no
    arguments at all still print the help."""
    assert_user_error(run_cli("prompt", "hi", "-m", scout_ckpt, "--threads", "abc"), "'--threads'", "prompt --help")
    assert_user_error(run_cli("prompt", "hi", "-m", scout_ckpt, "--bogus"), "--bogus")
    assert_user_error(run_cli("eval", "-m", scout_ckpt), "--text")
    assert_user_error(run_cli("no-such-command"), "no-such-command", "llama4-local --help")
    bare = run_cli()
    assert bare.returncode == 2 and "Usage" in bare.stdout + bare.stderr and "prompt" in bare.stdout + bare.stderr


def test_exit_codes(scout_ckpt, tmp_path):
    ok = run_cli("prompt", "hi", "-m", scout_ckpt, "--device", "cpu", "-n", "1")
    assert ok.returncode == 0
    assert run_cli("prompt", "hi").returncode == 2  # usage: --model missing
    assert run_cli("no-such-command").returncode == 2
    assert_user_error(prompt(scout_ckpt, "--dtype", "int3"), "--dtype")


def test_shard_headers_read_once_per_state_of_the_files(broken, monkeypatch):
    """`chat` lists the checkpoint three times (vision? text, tower): each header is read once,
    and a shard changed on disk afterwards is read again (its error is not hidden)."""
    from llama4_local import checkpoint

    reads = []
    real = checkpoint.open_shard
    monkeypatch.setattr(checkpoint, "open_shard", lambda p: reads.append(p) or real(p))
    shards = first_shard(broken)
    first = checkpoint.list_tensors(broken)
    assert sorted({p.name for p in reads}) == shards and len(reads) == len(shards)
    assert checkpoint.list_tensors(broken) == first and len(reads) == len(shards)
    shard = broken / shards[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.UserError, match=shards[0]):
        checkpoint.list_tensors(broken)


# -- untrusted input at every edge (the server takes what any client sends) ---------------------


def test_stdin_that_is_not_utf8(scout_ckpt):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "cli", "prompt", "-", "-m", str(scout_ckpt), "--device", "cpu", "-n", "2"],
        input=b"hi \xff there",
        capture_output=True,
    )
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    assert_user_error(r, "standard input is not UTF-8", "0xff")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_config_value_that_is_not_a_number(broken, value):
    path = broken / "config.json"
    text = path.read_text()
    key = '"rms_norm_eps": '
    start = text.index(key) + len(key)
    end = start + len(text[start:].split(",")[0].split("\n")[0])
    path.write_text(text[:start] + value + text[end:])
    assert_user_error(prompt(broken), "config.json", value, "not a number")


@pytest.mark.parametrize(
    "template, words",
    [
        ('{{ raise_exception("only system and user roles") }}', ["chat template", "only system and user roles"]),
        ("{% for i in range(10**9) %}x{% endfor %}", ["chat template", "OverflowError"]),
        ("{{ messages.__class__.__mro__ }}", ["chat template"]),
        ("{{ 1 / 0 }}", ["chat template", "ZeroDivisionError"]),
    ],
)
def test_chat_template_that_raises_or_escapes(broken, template, words):
    path = broken / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = template
    path.write_text(json.dumps(cfg))
    assert_user_error(prompt(broken), *words)


@pytest.mark.parametrize("shard", ["../../../etc/passwd", "/etc/passwd", "sub/model.safetensors", ".."])
def test_index_shard_names_outside_the_checkpoint(broken, shard):
    path = broken / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = shard
    path.write_text(json.dumps(index))
    assert_user_error(prompt(broken), "not a file in the checkpoint directory")

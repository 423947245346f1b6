"""`info`: architecture, parameter counts, quantization and the memory plan."""

import json
from pathlib import Path

from tests.cli_util import run_cli
from tests.test_bad_input import assert_user_error

DATA = Path(__file__).parent / "data"


def info(*args):
    r = run_cli("info", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_scout_config_alone(tmp_path):
    (tmp_path / "config.json").write_text((DATA / "scout-instruct-config.json").read_text())
    res = info(tmp_path, "--gpu-memory", "24GiB")
    assert 107.5e9 < res["parameters_text"] < 108.0e9
    assert 108.5e9 < res["parameters_total"] < 109.0e9  # "109B" with the vision tower
    assert 17.0e9 < res["parameters_active"] < 17.3e9  # "17B active"
    assert res["experts"] == 16 and res["layers"] == 48 and res["nope_layers"][:2] == [3, 7]
    # bf16 attention and shared experts, plus the 2 GiB vision tower, do not fit 24 GiB...
    (plan,) = res["plans"]
    assert "vision tower" in plan["error"] and "--no-vision" in plan["error"]
    # ...26 GiB holds them and a few expert slots.
    (plan,) = info(tmp_path, "--gpu-memory", "26GiB")["plans"]
    assert "error" not in plan and plan["plan"]["used"] <= 26 * 2**30 and plan["plan"]["slots"] > 0


def test_quantized_and_multimodal_checkpoints(scout_int4, multimodal_ckpt):
    q = info(scout_int4[0])
    assert q["quantization"]["parts"] == ["experts", "shared"] and "group 64" in q["quantization"]["scheme"]
    assert [p["plan"]["all_resident"] for p in q["plans"]] == [True, True]
    m = info(multimodal_ckpt)
    assert m["architecture"] == "Llama4ForConditionalGeneration" and m["parameters_vision"] > 0
    assert m["parameters_total"] == m["parameters_text"] + m["parameters_vision"]


def test_table_output(scout_int4):
    r = run_cli("info", scout_int4[0], "--gpu-memory", "1GiB")
    assert r.returncode == 0, r.stderr
    assert "memory plan for 1.0 GiB" in r.stdout and "expert cache" in r.stdout


def test_bad_info_input(tmp_path, scout_ckpt):
    assert_user_error(run_cli("info", tmp_path / "missing"), "does not exist")
    assert_user_error(run_cli("info", scout_ckpt, "--context", "0"), "--context")
    assert_user_error(run_cli("info", scout_ckpt, "--gpu-memory", "lots"), "size")

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
    # bf16 attention and shared experts, plus the 2 GiB vision tower, fit 24 GiB with the
    # embeddings and the tower's blocks in host RAM, and a few expert slots...
    (plan,) = res["plans"]
    assert "error" not in plan and plan["plan"]["used"] <= 24 * 2**30 and plan["plan"]["slots"] > 0
    assert list(plan["plan"]["host_dense"]) == ["embeddings", "vision blocks"]
    # ...but not 22 GiB.
    (plan,) = info(tmp_path, "--gpu-memory", "22GiB")["plans"]
    assert "vision tower" in plan["error"] and "--no-vision" in plan["error"]


def test_quantized_and_multimodal_checkpoints(scout_int4, multimodal_ckpt):
    q = info(scout_int4[0])
    assert q["quantization"]["parts"] == ["experts", "shared"] and "group 64" in q["quantization"]["scheme"]
    assert q["quantization"]["lm_head_cpu"] == "Q8_0"  # not calibrated: the head's Q8_0 blocks beside it
    assert [p["plan"]["all_resident"] for p in q["plans"]] == [True, True]
    m = info(multimodal_ckpt)
    assert m["architecture"] == "Llama4ForConditionalGeneration" and m["parameters_vision"] > 0
    assert m["parameters_total"] == m["parameters_text"] + m["parameters_vision"]


def test_table_output(scout_int4):
    r = run_cli("info", scout_int4[0], "--gpu-memory", "1GiB")
    assert r.returncode == 0, r.stderr
    assert "memory plan for 1.0 GiB" in r.stdout and "expert cache" in r.stdout
    assert "this machine" in r.stdout and "cores" in r.stdout  # the line wraps at 80 columns


def test_info_says_what_this_machine_runs_with(scout_int4):
    from quant import cpu_kernel

    m = info(scout_int4[0])["machine"]
    assert m["physical_cores"] >= 1 and m["available_memory"] > 0
    assert m["cpu_kernels"] in (cpu_kernel.isa(), None)
    assert m["int4_bf16_gemm_from_rows"] == (cpu_kernel.bf16_gemm_rows() if m["cpu_kernels"] else 0)
    assert m["native_bf16"] == cpu_kernel.native_bf16()
    assert m["int8_activation_span"] == (cpu_kernel.int8_span(128) if m["cpu_kernels"] else None)
    assert m["int8_activation_span"] in (32, 128, None)
    dot = m["cpu_kernels"] and cpu_kernel.available() and cpu_kernel.half_bf16_dot_default()
    assert m["bf16_dot_decode"] == bool(dot)


def test_bad_info_input(tmp_path, scout_ckpt):
    assert_user_error(run_cli("info", tmp_path / "missing"), "does not exist")
    assert_user_error(run_cli("info", scout_ckpt, "--context", "0"), "--context")
    assert_user_error(run_cli("info", scout_ckpt, "--gpu-memory", "lots"), "size")
    assert_user_error(run_cli("info"), "which checkpoint")
    assert_user_error(run_cli("info", scout_ckpt, "-m", tmp_path), "two models")


def test_info_takes_the_model_by_m_too(tmp_path):
    (tmp_path / "config.json").write_text((DATA / "scout-instruct-config.json").read_text())
    by_m, by_arg = (info(*m, "--gpu-memory", "24GiB") for m in (("-m", tmp_path), (tmp_path,)))
    assert by_m["parameters_total"] > 1e11 and by_m["plans"][0]["gpu_memory"] == 24 * 2**30
    steady = ("machine", "plans")  # this machine's free memory, read at each run
    assert {k: v for k, v in by_m.items() if k not in steady} == {k: v for k, v in by_arg.items() if k not in steady}


def maverick_dir(tmp_path, quantized: bool):
    raw = json.loads((DATA / "maverick-instruct-config.json").read_text())
    if quantized:  # what `quantize` writes for it by default: experts, shared experts, dense MLPs
        from quant.format import QuantScheme
        from quant.quantize import DEFAULT_PARTS, _ignore_list

        raw["quantization_config"] = QuantScheme().config(_ignore_list(DEFAULT_PARTS))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_maverick_config_alone(tmp_path):
    res = info(maverick_dir(tmp_path, False), "--gpu-memory", "80GiB")
    assert 400.5e9 < res["parameters_text"] < 401e9 and 401e9 < res["parameters_total"] < 402e9  # "400B"
    assert 17.1e9 < res["parameters_active"] < 17.3e9  # "17B active"
    assert res["parameters_routed_experts"] == 24 * 128 * 3 * 5120 * 8192
    assert res["experts"] == 128 and res["moe_layers"] == 24
    (plan,) = res["plans"]  # bf16 dense MLPs (11 GiB) and attention fit 80 GiB beside 209 experts
    assert not plan["plan"]["all_resident"] and plan["plan"]["slots"] > 0


def test_maverick_int4_plans_at_host_sizes(tmp_path):
    res = info(maverick_dir(tmp_path, True), "--gpu-memory", "24GiB,80GiB", "--host-memory", "64GiB,256GiB")
    assert res["quantization"]["parts"] == ["experts", "shared", "mlp"]
    assert [(p["gpu_memory"] >> 30, p["host_memory"] >> 30) for p in res["plans"]] == [
        (24, 64),
        (24, 256),
        (80, 64),
        (80, 256),
    ]
    small, big = res["plans"][0]["plan"], res["plans"][1]["plan"]
    one = small["expert_bytes"]
    assert small["host_experts"] == 64 * 2**30 // one < 3072  # the rest are read from disk
    assert big["host_experts"] == 3072  # INT4 experts are about 191 GiB: 256 GiB holds them all
    assert all(p["plan"]["used"] <= p["gpu_memory"] for p in res["plans"])


def test_maverick_table(tmp_path):
    r = run_cli("info", maverick_dir(tmp_path, True), "--gpu-memory", "24GiB", "--host-memory", "64GiB")
    assert r.returncode == 0, r.stderr
    assert "read from disk on demand" in r.stdout and "64.0 GiB of host RAM" in r.stdout


def test_maverick_fp8_config_alone(tmp_path):
    """The FP8 release's config without its weights: FP8 experts are a byte per weight in the plan."""
    from tests.fp8_util import fp8_scheme, quantization_config

    raw = json.loads((DATA / "maverick-instruct-config.json").read_text())
    raw["quantization_config"] = quantization_config(fp8_scheme("channel", None))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    res = info(tmp_path, "--gpu-memory", "80GiB", "--host-memory", "512GiB")
    assert res["quantization"]["scheme"].startswith("FP8 e4m3")
    (p,) = res["plans"]
    gate_up, down = 8192 * 5120 + 8192 * 2, 5120 * 8192 + 5120 * 2  # a byte per weight, a bf16 scale per row
    assert p["plan"]["expert_bytes"] == 2 * gate_up + down
    assert p["plan"]["host_experts"] == 3072  # 3072 x 126 MB = 378 GiB of FP8 experts fit 512 GiB

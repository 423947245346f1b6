"""The same checks on a CUDA GPU (skipped without one)."""

import json

import pytest
import torch

from llama4_local.loader import load_model
from tests.cli_util import run_cli
from tests.factory import load_reference

pytestmark = pytest.mark.cuda


def rel_err(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


@pytest.mark.parametrize("kind", ["scout", "maverick", "multimodal"])
def test_float32_logits_match_transformers(all_ckpts, kind):
    ours, _ = load_model(all_ckpts[kind], "float32", "cuda")
    ref = load_reference(all_ckpts[kind])
    ids = torch.randint(0, ours.cfg.vocab_size, (60,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0]
    got = ours(ids.cuda(), ours.new_cache(60), last_only=False)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("kind", ["scout", "multimodal"])
def test_bfloat16_close_to_transformers_bfloat16(all_ckpts, kind):
    ours, _ = load_model(all_ckpts[kind], "bfloat16", "cuda")
    ref = load_reference(all_ckpts[kind], torch.bfloat16).cuda()
    exact_ref = load_reference(all_ckpts[kind])
    # Both round to bfloat16 at the same places; neither is further from float32 than the other,
    # over three prompts (with top-2 routing, ours summed the routed outputs one by one until
    # session 14: 0.107 against 0.068 on the H200; test_model_oracle checks the order on the CPU).
    ours_err = ref_err = 0.0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, ours.cfg.vocab_size, (60,), generator=g)
        with torch.no_grad():
            want = ref(input_ids=ids[None].cuda()).logits[0]
            exact = exact_ref(input_ids=ids[None]).logits[0]
        got = ours(ids.cuda(), ours.new_cache(60), last_only=False)
        assert rel_err(got, want) < 5e-2
        ours_err, ref_err = ours_err + rel_err(got, exact), ref_err + rel_err(want, exact)
    assert ours_err < 1.5 * ref_err + 3e-3, (ours_err, ref_err)


def test_incremental_decode_equals_full_forward(scout_ckpt):
    ours, _ = load_model(scout_ckpt, "float32", "cuda")
    ids = torch.randint(0, ours.cfg.vocab_size, (45,), device="cuda")
    full = ours(ids, ours.new_cache(45), last_only=False)
    cache = ours.new_cache(45)
    steps = torch.cat([ours(ids[i : i + 1], cache) for i in range(45)])
    assert rel_err(steps, full) < 1e-5


def test_queries_a_few_at_a_time_on_cuda(scout_ckpt, monkeypatch):
    """Past SCORE_KEYS keys the queries attend a few at a time (CUDA's math SDPA backend would
    materialize [H, T, S] scores): the same logits as one call."""
    from llama4_local import model as model_mod

    ours, _ = load_model(scout_ckpt, "float32", "cuda")
    ids = torch.randint(0, 300, (60,), generator=torch.Generator().manual_seed(6)).cuda()
    whole = ours(ids, ours.new_cache(60), last_only=False)
    monkeypatch.setattr(model_mod, "SCORE_KEYS", 16)
    assert rel_err(ours(ids, ours.new_cache(60), last_only=False), whole) < 1e-5


def test_prompt_cli_on_cuda_matches_cpu(scout_ckpt):
    args = ("prompt", "The quick brown fox", "-m", scout_ckpt, "--raw", "--temperature", "0", "--ignore-eos")
    args += ("--dtype", "float32", "--json", "-n", "32")
    gpu = run_cli(*args, "--device", "cuda")
    cpu = run_cli(*args, "--device", "cpu")
    assert gpu.returncode == 0, gpu.stderr
    assert json.loads(gpu.stdout)["token_ids"] == json.loads(cpu.stdout)["token_ids"]


def test_int4_checkpoint_on_cuda(tmp_path, scout_ckpt):
    from quant.quantize import QuantizeOptions, quantize_checkpoint

    out = tmp_path / "q"
    quantize_checkpoint(scout_ckpt, out, QuantizeOptions(group_size=64, device="cuda"))
    gpu, _ = load_model(out, "bfloat16", "cuda")
    assert gpu.layers[0].feed_forward.experts.experts[0].gate_proj.path == "cuda"
    cpu, _ = load_model(out, "float32", "cpu")
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(0))
    want = cpu(ids, cpu.new_cache(20), last_only=False)
    cache = gpu.new_cache(20)
    got = torch.cat(
        [gpu(ids[:12].cuda(), cache, last_only=False)] + [gpu(ids[i : i + 1].cuda(), cache) for i in range(12, 20)]
    )
    assert rel_err(got, want) < 3e-2


@pytest.mark.parametrize("int4", ["stock", "triton"])
@pytest.mark.parametrize("miss,prefetch", [("swap", True), ("swap", False), ("cpu", True), ("auto", True)])
def test_offloaded_equals_resident_on_cuda(scout_int4, miss, prefetch, int4, monkeypatch):
    """The expert cache on the GPU (copy stream, events, pinned store) changes nothing computed,
    with the stock INT4 kernel and with the Triton one (which shares its host copy with the CPU)."""
    from offload.setup import OffloadOptions
    from tests.test_offload import PROMPT, run

    if int4 == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("LLAMA4_LOCAL_CUDA_INT4", int4)
    if int4 == "triton":  # the offloaded experts run one expert at a time: so does the reference
        from quant.modules import QuantizedExperts

        monkeypatch.setattr(QuantizedExperts, "fused", lambda self, *a: None)
    path = scout_int4[0]
    want, want_tokens = run(load_model(path, "bfloat16", "cuda")[0], PROMPT.cuda())
    for slots in (1, 3, 16):
        opts = OffloadOptions(slots=slots, miss_policy=miss, prefetch=prefetch)
        model, _ = load_model(path, "bfloat16", "cuda", offload=opts)
        m = model.offload
        assert m.kernel.quant_path == ("cuda" if int4 == "stock" else "triton")
        if miss == "swap":
            got, tokens = run(model, PROMPT.cuda())
            assert torch.equal(got, want) and tokens == want_tokens, slots
        else:
            # CPU-computed misses use the CPU kernel, which rounds bf16 activations to int8 per
            # row (avx2_q8) where the GPU kernel reads them as they are: 2.9% at 3 slots on the
            # H200 (2026-12-04). Fed the same tokens, since greedy choices can part at a near tie:
            # with greedy decoding the Triton run was 36% apart at 3 slots on the H200 (not yet
            # explained; a parted choice is the likely cause, not verified on a GPU yet).
            got, _ = run(model, PROMPT.cuda(), feed=want_tokens)
            assert rel_err(got, want) < 4e-2, slots
            # Triton reads the CPU kernel's layout: one host copy serves both
            assert (m.cpu_store is m.cache.store) == (int4 == "triton")
        t = m.totals()
        assert t.hits + t.misses == t.uses and (slots == 16 or t.bytes_moved > 0)
        assert t.copy_s >= 0


@pytest.mark.parametrize("miss", ["swap", "auto"])
def test_exclusive_host_tier_on_cuda(scout_int4, miss):
    """Host RAM holding some experts, none of the GPU's: an evicted expert is copied back into RAM
    on the copy stream after the compute that read its slot and before the next copy in; nothing
    computed changes."""
    from offload.setup import OffloadOptions
    from tests.test_offload import PROMPT, run

    path = scout_int4[0]
    want, want_tokens = run(load_model(path, "bfloat16", "cuda")[0], PROMPT.cuda())
    probe, _ = load_model(path, "bfloat16", "cuda", offload=OffloadOptions(slots=1, miss_policy="swap"))
    one = probe.offload.cache.layout.nbytes
    for slots, held in ((3, 6), (6, 10)):
        opts = OffloadOptions(slots=slots, miss_policy=miss, host_memory=held * one)
        model, _ = load_model(path, "bfloat16", "cuda", offload=opts)
        m = model.offload
        assert m.cache.store.exclusive
        if miss == "swap":
            got, tokens = run(model, PROMPT.cuda())
            assert torch.equal(got, want) and tokens == want_tokens, slots
            assert m.totals().spills > 0
        else:  # CPU-computed misses round activations to int8 (test_offloaded_equals_resident_on_cuda)
            got, _ = run(model, PROMPT.cuda(), feed=want_tokens)
            assert rel_err(got, want) < 4e-2, slots
        assert not set(m.cache.store.blocks) & set(m.cache.slot_of)


@pytest.mark.parametrize("miss", ["swap", "auto"])
def test_embeddings_in_host_ram_on_cuda(scout_int4, miss):
    """A GPU budget that holds 3 of the experts: the plan keeps the embeddings in host RAM (the
    checkpoint's mapped view), the model computes on the GPU, and nothing computed changes, in
    the eager forward and in the piecewise decode's graphs."""
    from llama4_local.graph_decode import stepper
    from offload.setup import OffloadOptions
    from tests.test_offload import PROMPT, run

    path = scout_int4[0]
    want, want_tokens = run(load_model(path, "bfloat16", "cuda")[0], PROMPT.cuda())
    probe, _ = load_model(path, "bfloat16", "cuda", offload=OffloadOptions(gpu_memory=2**30))
    p = probe.plan
    budget = p.used - p.dense["embeddings"] - (p.experts_total - 3) * p.expert_bytes
    model, _ = load_model(path, "bfloat16", "cuda", offload=OffloadOptions(gpu_memory=budget, miss_policy=miss))
    assert model.plan.slots == 3 and "embeddings" in model.plan.host_dense and model.offload is not None
    assert model.embed_tokens.weight.device.type == "cpu" and model.device.type == "cuda"
    assert model.new_cache(4).layers[0].buf.k.device.type == "cuda"
    if miss == "swap":
        got, tokens = run(model, PROMPT.cuda())
        assert torch.equal(got, want) and tokens == want_tokens
    else:  # CPU-computed misses round activations to int8 (test_offloaded_equals_resident_on_cuda)
        got, _ = run(model, PROMPT.cuda(), feed=want_tokens)
        assert rel_err(got, want) < 4e-2
    cache = model.new_cache(PROMPT.shape[0] + 6)
    model(PROMPT.cuda(), cache)
    step = stepper(model, cache, "graph")
    steps = [step(t).clone() for t in want_tokens]
    assert rel_err(torch.cat(steps), want[PROMPT.shape[0] :]) < 4e-2


def test_q6_head_on_cuda_beside_an_expert_cache(tmp_path, scout_int4):
    """A checkpoint with a Q6 head sidecar: with every expert on the GPU the head is read as
    stored; beside an expert cache the plan takes the Q6 blocks onto the GPU (Triton's kernel),
    and the logits stay within the Q6 head's rounding of the resident model's."""
    import shutil

    from llama4_local.checkpoint import HEAD_SIDECAR, open_checkpoint
    from offload.setup import OffloadOptions
    from quant import q6
    from quant.gptq import error_feedback
    from quant.head import Q6Linear, sidecar_kind, write_head_sidecar
    from tests.test_offload import PROMPT, run

    pytest.importorskip("triton")
    path = tmp_path / "q6"
    shutil.copytree(scout_int4[0], path)
    for old in path.glob("lm_head.*llama4-local"):
        old.unlink()
    w = open_checkpoint(path).get("lm_head.weight")
    x = torch.randn(4 * w.shape[1], w.shape[1], generator=torch.Generator().manual_seed(0))
    write_head_sidecar(path / HEAD_SIDECAR, w, error_feedback(x.t() @ x))  # as `quantize` writes it
    assert sidecar_kind(path).startswith("Q6 (")
    resident, _ = load_model(path, "bfloat16", "cuda")
    assert not isinstance(resident.lm_head, Q6Linear)
    want, want_tokens = run(resident, PROMPT.cuda())
    probe, _ = load_model(path, "bfloat16", "cuda", offload=OffloadOptions(gpu_memory=2**30))
    p = probe.plan
    assert p.all_resident and not p.head_q6
    budget = p.used - p.dense["embeddings"] - (p.dense["lm_head"] - w.shape[0] * q6.row_bytes(w.shape[1]))
    budget -= (p.experts_total - 2) * p.expert_bytes
    model, _ = load_model(path, "bfloat16", "cuda", offload=OffloadOptions(gpu_memory=budget, miss_policy="swap"))
    assert model.plan.head_q6 and model.plan.slots == 2
    assert isinstance(model.lm_head, Q6Linear) and model.lm_head.q6.is_cuda
    got, _ = run(model, PROMPT.cuda(), feed=want_tokens)
    assert rel_err(got, want) < 5e-2  # Q6 rounding of random weights: ~2% (a wrong kernel: ~100%)


def test_plan_on_cuda_fits_free_memory(scout_int4):
    from offload.setup import OffloadOptions

    model, _ = load_model(scout_int4[0], "bfloat16", "cuda", offload=OffloadOptions(gpu_memory=2**30))
    assert model.plan is not None and model.plan.all_resident and model.offload is None


def test_image_features_and_logits_on_cuda(multimodal_ckpt):
    """The vision tower and the merge at <|patch|> on the GPU equal transformers (float32)."""
    from llama4_local.images import ImageSettings, prepare
    from tests.test_vision import _image_prompt, noise

    ours, _ = load_model(multimodal_ckpt, "float32", "cuda", vision=True)
    ref = load_reference(multimodal_ckpt)
    ids, pixels = _image_prompt(multimodal_ckpt, [noise(100, 170, seed=5), noise(60, 50, seed=6)])
    feats = ours.encode_images(pixels)
    assert feats.device.type == "cuda"
    logits = ours(torch.tensor(ids).cuda(), ours.new_cache(len(ids)), last_only=False, image_features=feats)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids]), pixel_values=pixels.float()).logits[0]
    assert rel_err(logits, want) < 1e-4
    settings = ImageSettings.from_dir(multimodal_ckpt, 56)
    assert prepare(noise(30, 30), settings).pixels.shape[0] == 1


def test_streamed_vision_and_host_embeddings_on_cuda(multimodal_ckpt, monkeypatch):
    """Beside an expert cache the embeddings and the vision blocks stay in host RAM, each block
    copied into one block's room on the GPU as it runs: the same features bit for bit as the
    resident tower on the GPU, and the logits of an image prompt those of the resident model."""
    from llama4_local import vision
    from llama4_local.vision import VisionConfig, vision_memory
    from offload.setup import OffloadOptions
    from tests.test_vision import _image_prompt, noise

    monkeypatch.setattr(vision, "STREAM_TILES", 8)  # the tiny tower's extra round would outweigh its blocks

    ids, pixels = _image_prompt(multimodal_ckpt, [noise(100, 170, seed=5), noise(60, 50, seed=6)])
    whole, _ = load_model(multimodal_ckpt, "float32", "cuda", vision=True)
    want_feats = whole.encode_images(pixels)
    want = whole(torch.tensor(ids).cuda(), whole.new_cache(len(ids)), last_only=False, image_features=want_feats)
    probe, _ = load_model(multimodal_ckpt, "float32", "cuda", vision=True, offload=OffloadOptions(gpu_memory=2**30))
    p = probe.plan
    blocks = p.dense["vision"] - vision_memory(VisionConfig.from_dir(multimodal_ckpt), 4, streamed=True)
    budget = p.used - p.dense["embeddings"] - blocks - (p.experts_total - 2) * p.expert_bytes
    opts = OffloadOptions(gpu_memory=budget, miss_policy="swap")
    ours, _ = load_model(multimodal_ckpt, "float32", "cuda", vision=True, offload=opts)
    assert ours.plan.slots == 2 and set(ours.plan.host_dense) == {"embeddings", "vision blocks"}
    layers = ours.vision.vision_model.model.layers
    assert layers[0].mlp.fc1.weight.device.type == "cpu" and ours.vision.slot.mlp.fc1.weight.device.type == "cuda"
    feats = ours.encode_images(pixels)
    assert feats.device.type == "cuda" and torch.equal(feats, want_feats)
    logits = ours(torch.tensor(ids).cuda(), ours.new_cache(len(ids)), last_only=False, image_features=feats)
    assert rel_err(logits, want) < 1e-5


def test_nf4_on_cuda(tmp_path, scout_ckpt):
    """bitsandbytes' CUDA NF4 kernels give what its CPU path gives."""
    from quant.quantize import QuantizeOptions, quantize_checkpoint

    out = tmp_path / "nf4"
    quantize_checkpoint(scout_ckpt, out, QuantizeOptions(group_size=64, scheme="nf4"))
    ids = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(0))
    cpu, _ = load_model(out, "float32", "cpu")
    want = cpu(ids, cpu.new_cache(16), last_only=False)
    gpu32, _ = load_model(out, "float32", "cuda")
    exact = rel_err(gpu32(ids.cuda(), gpu32.new_cache(16), last_only=False), want)
    gpu, _ = load_model(out, "bfloat16", "cuda")
    bf16 = rel_err(gpu(ids.cuda(), gpu.new_cache(16), last_only=False), want)
    # float32 on both: the same dequantized weights, only the summation order differs
    assert exact < 1e-4, (exact, bf16)
    assert bf16 < 3e-2, (exact, bf16)


def test_prompt_with_image_on_cuda_matches_cpu(tmp_path, multimodal_ckpt):
    """`prompt --image` end to end on the GPU: the same greedy tokens as on the CPU (float32)."""
    from tests.test_vision import noise

    noise(100, 170, seed=8).save(tmp_path / "a.png")
    args = ("prompt", "What is in this picture?", "-m", multimodal_ckpt, "--image", tmp_path / "a.png")
    args += ("--temperature", "0", "--ignore-eos", "--dtype", "float32", "--json", "-n", "16")
    gpu = run_cli(*args, "--device", "cuda")
    cpu = run_cli(*args, "--device", "cpu")
    assert gpu.returncode == 0, gpu.stderr
    assert cpu.returncode == 0, cpu.stderr
    g, c = json.loads(gpu.stdout), json.loads(cpu.stdout)
    assert g["stats"]["images"] == 1 and g["token_ids"] == c["token_ids"]


def test_grouped_triton_prefill_equals_per_expert(scout_int4, monkeypatch):
    """MoE prefill through quant/triton_moe.py's grouped kernels (Triton INT4) against the same
    experts one at a time, and against the CPU in float32."""
    pytest.importorskip("triton")
    from quant import triton_moe
    from quant.modules import QuantizedExperts

    monkeypatch.setenv("LLAMA4_LOCAL_CUDA_INT4", "triton")
    monkeypatch.setattr(triton_moe, "MAX_TOKENS", 1 << 30)  # off by default: slower than dequantize + GEMM
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(5))
    model, _ = load_model(scout_int4[0], "bfloat16", "cuda")
    calls = []
    fused = QuantizedExperts.fused

    def counted(self, *a):
        y = fused(self, *a)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(QuantizedExperts, "fused", counted)
    got = model(ids.cuda(), model.new_cache(40), last_only=False)
    assert calls == [True] * model.cfg.num_layers  # every MoE layer went through the grouped kernels
    monkeypatch.setattr(QuantizedExperts, "fused", lambda self, *a: None)
    want = model(ids.cuda(), model.new_cache(40), last_only=False)
    cpu, _ = load_model(scout_int4[0], "float32", "cpu")
    exact = cpu(ids, cpu.new_cache(40), last_only=False)
    assert rel_err(got, want) < 2e-2
    assert rel_err(got, exact) < 1.5 * rel_err(want, exact) + 1e-3


def test_blocked_cholesky_and_feedback_on_cuda():
    """GPTQ's factor (quant.gptq.cholesky_upper_: products, cuSOLVER's diagonal blocks, a
    right-side triangular solve) and its feedback on the GPU equal the CPU's within float32."""
    from quant.gptq import cholesky_upper_, error_feedback

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 600, generator=g) * torch.linspace(0.2, 3.0, 600)
    h = x.t() @ x / 1200 + 0.01 * torch.eye(600)
    exact = torch.linalg.cholesky(h.double(), upper=True)
    got = cholesky_upper_(h.cuda(), 128).cpu().double()
    assert (got - exact).abs().max() <= 4 * (torch.linalg.cholesky(h, upper=True).double() - exact).abs().max()
    torch.testing.assert_close(error_feedback(h.cuda()).cpu(), error_feedback(h), rtol=1e-3, atol=1e-4)

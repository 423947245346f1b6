"""Image input against transformers: pixels, tile layout, features, logits and greedy tokens."""

from __future__ import annotations

import json
import shutil
import struct
import zlib

import pytest
import torch
from PIL import Image

from llama4_local.images import ImageReader, ImageSettings, prepare, read_image
from llama4_local.loader import load_model
from llama4_local.runner import build_prompt
from llama4_local.tokenizer import Tokenizer
from tests import oracle_images
from tests.cli_util import greedy_json, run_cli
from tests.factory import PREPROCESSOR, load_reference
from tests.test_bad_input import assert_user_error

TINY = {k: PREPROCESSOR[k] for k in ("size", "max_patches")}


def noise(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    px = torch.randint(0, 256, (h, w, channels), dtype=torch.uint8, generator=g)
    if mode == "L":
        px = px[..., 0]
    return Image.frombytes(mode, (w, h), bytes(px.flatten().tolist()))


def tower_output(ref, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' vision tower output for `pixels` (before the projector). Its releases up to
    about 5.20 also ask get_image_features for a vision_feature_select_strategy it does not use."""
    import inspect

    extra = {}
    if "vision_feature_select_strategy" in inspect.signature(ref.get_image_features).parameters:
        extra["vision_feature_select_strategy"] = None  # what their forward passes by default
    return ref.get_image_features(pixel_values=pixels, return_dict=True, **extra).last_hidden_state


def oracle_composites_alpha_on_white() -> bool:
    """Whether this transformers' convert_to_rgb puts transparency onto white, as
    llama4_local.images.to_rgb does (its older releases dropped the alpha channel, keeping the
    colour values under it)."""
    from transformers.image_transforms import convert_to_rgb

    clear = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    out = convert_to_rgb(clear)
    return out.getpixel((0, 0)) == (255, 255, 255) if isinstance(out, Image.Image) else bool(out[0, 0, 0] == 255)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- preprocessing --------------------------------------------------------------------------------

SIZES = [
    (336, 336),  # exactly one tile
    (50, 60),  # smaller than a tile: padded, not upscaled
    (200, 300),  # one tile, downscaled
    (500, 900),  # 2x3 tiles + global view
    (1500, 400),  # tall
    (400, 1500),  # wide
    (1000, 1000),  # 3x3
    (3000, 90),  # extreme aspect ratio
    (2000, 3000),  # large, many tiles
]


@pytest.mark.parametrize("size", SIZES)
def test_pixels_equal_llama4_image_processor(size):
    ref = oracle_images.image_processor()
    img = noise(*size, seed=size[0])
    want = ref(img, return_tensors="pt")
    got = prepare(img, ImageSettings())
    assert got.grid == tuple(want["aspect_ratios"][0].tolist())
    assert got.pixels.dtype == want["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(got.pixels, want["pixel_values"])


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_pixels_equal_for_transparent_and_grey_images(mode):
    from llama4_local.images import to_rgb

    if mode == "RGBA" and not oracle_composites_alpha_on_white():
        pytest.skip("this transformers drops the alpha channel; ours composites on white, as its later releases")
    ref = oracle_images.image_processor(**TINY)
    img = noise(90, 130, seed=7, mode=mode)
    want = ref(img, return_tensors="pt")["pixel_values"]
    assert torch.equal(prepare(to_rgb(img), ImageSettings(tile=56, max_patches=6)).pixels, want)


def test_settings_come_from_preprocessor_config(multimodal_ckpt):
    s = ImageSettings.from_dir(multimodal_ckpt, 56)
    assert (s.tile, s.max_patches) == (56, 6)


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_formats_decode_to_the_same_pixels_as_pillow(tmp_path, fmt):
    img = noise(30, 50, seed=5)
    path = tmp_path / f"a.{fmt}"
    img.save(path, **({"lossless": True} if fmt == "webp" else {}))
    got = read_image(path)
    assert got.size == (50, 30) and got.mode == "RGB"
    if fmt != "jpeg":  # lossless formats round-trip exactly
        assert got.tobytes() == img.tobytes()


def test_exif_orientation_is_applied(tmp_path):
    img = noise(40, 100, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    assert read_image(path).size == (40, 100)  # (width, height): displayed upright, portrait


# -- the prompt -----------------------------------------------------------------------------------


def test_prompt_layout_equals_llama4_processor(multimodal_ckpt):
    """Our expanded chat prompt equals what Llama4Processor makes of the same text and images."""
    tok = Tokenizer(multimodal_ckpt)
    reader = ImageReader(multimodal_ckpt, tok)
    images = [noise(100, 170, seed=1), noise(40, 40, seed=2)]  # 2x3 tiles + global; one tile
    prepared = [prepare(im, reader.settings) for im in images]
    ids = reader.expand(build_prompt(tok, "Compare them.", "Be brief.", False, images=2), prepared)

    proc = oracle_images.processor(multimodal_ckpt, **TINY)
    text = tok.render_chat(
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}],
            },
        ]
    )
    want = proc(text=text, images=images, return_tensors="pt", add_special_tokens=False)
    assert ids == want["input_ids"][0].tolist()
    assert torch.equal(torch.cat([p.pixels for p in prepared]), want["pixel_values"])
    patch = tok.token_id("<|patch|>")
    assert sum(i == patch for i in ids) == (7 + 1) * 4  # 7 tiles + 1, 4 tokens each


# -- the model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(multimodal_ckpt):
    ours, _ = load_model(multimodal_ckpt, "float32", "cpu", vision=True)
    return ours, load_reference(multimodal_ckpt)


def test_image_features_equal_transformers(models, multimodal_ckpt):
    ours, ref = models
    pixels = prepare(noise(120, 60, seed=4), ImageSettings.from_dir(multimodal_ckpt, 56)).pixels
    got = ours.encode_images(pixels)
    with torch.no_grad():
        f = tower_output(ref, pixels.float())
        want = ref.multi_modal_projector(f.view(-1, f.shape[-1]))
    assert got.shape == want.shape == (pixels.shape[0] * 4, 128)
    assert rel(got, want) < 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_tower_equals_the_resident_one(multimodal_ckpt, monkeypatch, dtype):
    """The ViT blocks left in host RAM and copied one at a time into one block's room: the same
    features bit for bit, for fewer tiles than a round and for several rounds (each round's tiles
    through a block before the next block is copied; rounds of whole passes, 4 tiles here)."""
    from llama4_local import vision as vision_mod
    from llama4_local.vision import VisionConfig, load_vision, vision_checkpoint

    monkeypatch.setattr(vision_mod, "STREAM_TILES", 5)
    vcfg, ckpt = VisionConfig.from_dir(multimodal_ckpt), vision_checkpoint(multimodal_ckpt)
    torch_dtype = getattr(torch, dtype)
    resident = load_vision(ckpt, vcfg, torch_dtype, torch.device("cpu"))
    streamed = load_vision(ckpt, vcfg, torch_dtype, torch.device("cpu"), streamed=True)
    blocks = streamed.vision_model.model.layers
    assert resident.slot is None and streamed.slot is not None and len(blocks) > 1
    copies = []
    real = vision_mod.Vision._on_device
    monkeypatch.setattr(vision_mod.Vision, "_on_device", lambda self, b: copies.append(b) or real(self, b))
    settings = ImageSettings.from_dir(multimodal_ckpt, 56)
    for img, rounds in ((noise(60, 50, seed=5), 1), (noise(200, 120, seed=6), 2)):
        pixels = prepare(img, settings).pixels
        want = resident(pixels, tiles_per_pass=2)
        copies.clear()
        assert torch.equal(streamed(pixels, tiles_per_pass=2), want), pixels.shape
        assert vision_mod.stream_round(2) == 4 and -(-pixels.shape[0] // 4) == rounds
        assert copies == list(blocks) * rounds
        pairs = zip(streamed.slot.parameters(), blocks[-1].parameters(), strict=True)
        assert all(p.data_ptr() != q.data_ptr() for p, q in pairs)  # copies in the room, not the blocks


def _image_prompt(ckpt, images, text="What is in these pictures?"):
    tok = Tokenizer(ckpt)
    reader = ImageReader(ckpt, tok)
    prepared = [prepare(im, reader.settings) for im in images]
    ids = reader.expand(build_prompt(tok, text, None, False, images=len(images)), prepared)
    return ids, torch.cat([p.pixels for p in prepared])


def test_bfloat16_features_no_further_from_float32_than_transformers_own(models, multimodal_ckpt):
    ours, ref = models
    pixels = prepare(noise(100, 170, seed=14), ImageSettings.from_dir(multimodal_ckpt, 56)).pixels
    exact = ours.encode_images(pixels)
    ours16, _ = load_model(multimodal_ckpt, "bfloat16", "cpu", vision=True)
    ref16 = load_reference(multimodal_ckpt, torch.bfloat16)
    with torch.no_grad():
        f = tower_output(ref16, pixels)
        theirs = ref16.multi_modal_projector(f.view(-1, f.shape[-1]))
    got = ours16.encode_images(pixels)
    assert got.dtype == torch.bfloat16
    assert rel(got, exact) <= 1.5 * rel(theirs, exact)


@pytest.fixture(scope="module")
def scout_multimodal(tmp_path_factory):
    """Scout-like text (every layer MoE, qk-norm, llama3 scaling), 5.x spelling, one file, with vision."""
    from tests.factory import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("scout-mm"), "scout", multimodal=True, seed=1)


def test_logits_equal_transformers_on_a_scout_like_config(scout_multimodal):
    ours, _ = load_model(scout_multimodal, "float32", "cpu", vision=True)
    ref = load_reference(scout_multimodal)
    ids, pixels = _image_prompt(scout_multimodal, [noise(200, 90, seed=15)])
    feats = ours.encode_images(pixels)
    logits = ours(torch.tensor(ids), ours.new_cache(len(ids)), last_only=False, image_features=feats)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids]), pixel_values=pixels.float()).logits[0]
    assert rel(logits, want) < 1e-4


def test_logits_equal_transformers_with_two_images(models, multimodal_ckpt):
    ours, ref = models
    ids, pixels = _image_prompt(multimodal_ckpt, [noise(100, 170, seed=5), noise(60, 50, seed=6)])
    assert len(ids) > 2 * 8  # the image tokens cross several attention chunks of 8
    feats = ours.encode_images(pixels)
    logits = ours(torch.tensor(ids), ours.new_cache(len(ids)), last_only=False, image_features=feats)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids]), pixel_values=pixels.float()).logits[0]
    assert rel(logits, want) < 1e-4
    # Prefill in pieces that cut through an image gives the same last logits.
    from llama4_local.generate import prefill

    last = prefill(ours, torch.tensor(ids), ours.new_cache(len(ids)), 5, feats)
    assert rel(last, want[-1]) < 1e-4


@pytest.mark.parametrize("count", [1, 2])
def test_prompt_cli_greedy_equals_transformers_generate(tmp_path, multimodal_ckpt, models, count):
    from transformers import GenerationConfig

    _, ref = models
    images = [noise(100, 170, seed=8), noise(64, 64, seed=9)][:count]
    paths = []
    for i, im in enumerate(images):
        paths += ["--image", tmp_path / f"img{i}.png"]
        im.save(paths[-1])
    out = greedy_json("What is in these pictures?", "-m", multimodal_ckpt, *paths, "-n", "24", "--prefill-chunk", "7")
    ids, pixels = _image_prompt(multimodal_ckpt, images)
    assert out["prompt_tokens"] == len(ids)
    assert out["stats"]["images"] == count
    gen = GenerationConfig(do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), pixel_values=pixels.float(), generation_config=gen)[0, len(ids) :]
    assert out["token_ids"] == want.tolist()


def test_images_with_offloaded_experts_give_the_same_tokens(tmp_path, multimodal_ckpt):
    """Image features and the expert cache together: the same greedy tokens as everything resident."""
    from llama4_local.runner import PromptRequest, run_prompt
    from offload.setup import OffloadOptions

    noise(100, 170, seed=16).save(tmp_path / "a.png")
    common = dict(
        model=multimodal_ckpt,
        text="What is this?",
        images=[tmp_path / "a.png"],
        max_tokens=12,
        sampling={"temperature": 0.0},
        ignore_eos=True,
        dtype="float32",
        device="cpu",
        prefill_chunk=9,
    )
    want = run_prompt(PromptRequest(**common)).token_ids
    got = run_prompt(PromptRequest(**common, offload=OffloadOptions(slots=1, miss_policy="cpu")))
    assert got.token_ids == want
    assert got.stats.cache["uses"] > 0


def test_raw_prompt_places_images_at_placeholders(multimodal_ckpt):
    tok = Tokenizer(multimodal_ckpt)
    image = tok.token_id("<|image|>")
    ids = build_prompt(tok, "a<|image|>b", None, True, images=1)
    assert ids.count(image) == 1 and ids.index(image) > 1
    ids = build_prompt(tok, "ab", None, True, images=2)
    assert ids[:3] == [tok.bos_id, image, image]


# -- chat -----------------------------------------------------------------------------------------


def test_chat_image_turn_reuses_cache_and_matches_a_fresh_run(tmp_path, models, multimodal_ckpt):
    from llama4_local.chat import ChatSession
    from llama4_local.engine import Engine
    from llama4_local.sampling import SamplingParams

    ours, _ = models
    tok = Tokenizer(multimodal_ckpt)
    noise(100, 170, seed=10).save(tmp_path / "a.png")
    noise(50, 50, seed=11).save(tmp_path / "b.png")
    greedy = SamplingParams(temperature=0.0)

    def session():
        engine = Engine(ours, tok, {tok.eos_id}, 512, images=ImageReader(multimodal_ckpt, tok), cache_entries=1)
        return ChatSession(engine, greedy, 8)

    s = session()
    im = s.attach(tmp_path / "a.png")
    assert im.grid == (2, 3)
    first = s.reply("Describe it.")
    s.attach(tmp_path / "b.png")
    second = s.reply("And this one?")

    # The second turn ran only what the cache did not hold: the first reply's last token and
    # the new text, its image expanded.
    reader = ImageReader(multimodal_ckpt, tok)
    a, b = reader.load(tmp_path / "a.png"), reader.load(tmp_path / "b.png")
    msgs = s.all_messages()
    prompt1 = reader.expand(tok.encode_chat(msgs[:1]), [a])
    known = tok.render_chat(msgs[:1]) + first.text
    if first.finish_reason == "stop":
        known += tok.decode(first.token_ids[-1:], skip_special_tokens=False)
    new = reader.expand(tok.encode(tok.render_chat(msgs[:3])[len(known) :], add_special_tokens=False), [b])
    assert second.prefilled == 1 + len(new)

    # What the reused cache produced equals a fresh greedy run over the same tokens and images.
    history = prompt1 + first.token_ids + new
    feats = ours.encode_images(torch.cat([a.pixels, b.pixels]))
    cache = ours.new_cache(len(history) + 8)
    logits = ours(torch.tensor(history), cache, image_features=feats)
    want = []
    for _ in range(len(second.token_ids)):
        want.append(int(logits[-1].argmax()))
        logits = ours(torch.tensor(want[-1:]), cache)
    assert second.token_ids == want

    path = tmp_path / "conv.json"
    s.save(path)
    again = session()
    again.load(path)
    assert [m["content"] for m in again.messages] == [m["content"] for m in s.messages]


def test_chat_image_command_in_a_terminal(tmp_path, multimodal_ckpt):
    pexpect = pytest.importorskip("pexpect")
    import sys

    noise(100, 170, seed=12).save(tmp_path / "photo.png")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "cli", "chat", "-m", str(multimodal_ckpt), "--device", "cpu", "-n", "4", "--temperature", "0"],
        encoding="utf-8",
        timeout=120,
        env={"LLAMA4_LOCAL_HISTORY": str(tmp_path / "hist"), "PATH": "/usr/bin:/bin", "TERM": "dumb"},
    )
    child.expect(">>> ")
    child.sendline(f"/image {tmp_path / 'photo.png'}")
    child.expect(r"attached photo.png \(170x100, 7 tile\(s\), (\d+) tokens\)")
    child.expect(">>> ")
    child.sendline(f"/image {tmp_path / 'missing.png'}")
    child.expect("error: image .*missing.png does not exist")
    child.expect(">>> ")
    child.sendline("What is it?")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# -- quantize and plan ----------------------------------------------------------------------------


def test_quantize_keeps_vision_and_the_int4_model_reads_images(tmp_path, multimodal_ckpt, models):
    from safetensors import safe_open

    from llama4_local.checkpoint import list_tensors
    from quant.quantize import QuantizeOptions, quantize_checkpoint

    out = tmp_path / "int4"
    quantize_checkpoint(multimodal_ckpt, out, QuantizeOptions(group_size=32))
    assert (out / "preprocessor_config.json").is_file()
    src, dst = list_tensors(multimodal_ckpt), list_tensors(out)
    vision = [n for n in src if n.startswith(("vision_model.", "multi_modal_projector."))]
    assert vision
    for name in vision:
        with safe_open(src[name], "pt") as a, safe_open(dst[name], "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    q, _ = load_model(out, "float32", "cpu", vision=True)
    pixels = prepare(noise(70, 70, seed=13), ImageSettings.from_dir(out, 56)).pixels
    assert torch.equal(q.encode_images(pixels), models[0].encode_images(pixels))


def test_planner_counts_the_vision_tower(multimodal_ckpt):
    from llama4_local.config import TextConfig
    from llama4_local.info import model_info
    from llama4_local.vision import VisionConfig, vision_memory, vision_parameters
    from offload.plan import GiB, plan_memory

    raw = json.loads((multimodal_ckpt / "config.json").read_text())
    info = model_info(multimodal_ckpt, [2**30], 256)
    assert vision_parameters(VisionConfig.from_hf(raw)) == info["parameters_vision"]
    assert info["plans"][0]["plan"]["dense"]["vision"] == vision_memory(VisionConfig.from_hf(raw), 2)

    from pathlib import Path

    scout = json.loads((Path(__file__).parent / "data" / "scout-instruct-config.json").read_text())
    vcfg, tcfg = VisionConfig.from_hf(scout), TextConfig.from_hf(scout)
    assert vcfg.tokens_per_tile == 144
    assert 0.86e9 < vision_parameters(vcfg) < 0.88e9
    from offload.plan import Quantized

    q = Quantized(group_size=128, experts=True, shared=True, attention=False)
    without = plan_memory(tcfg, 24 * GiB, 8192, 2, q)
    extra = vision_memory(vcfg, 2)
    with_vision = plan_memory(tcfg, 24 * GiB, 8192, 2, q, vision=extra)
    assert with_vision.dense["vision"] == extra
    assert with_vision.used <= 24 * GiB < with_vision.used + with_vision.expert_bytes
    assert with_vision.slots < without.slots
    # Its blocks streamed in from host RAM (every expert does not fit): 1.43 GiB, 23 more slots.
    resident = vision_memory(vcfg, 2, streamed=True)
    streamed = plan_memory(tcfg, 24 * GiB, 8192, 2, q, vision=extra, vision_host=extra - resident)
    assert streamed.dense["vision"] == resident and streamed.host_dense["vision blocks"] == extra - resident
    assert 1.42 * GiB < extra - resident < 1.44 * GiB and streamed.slots - with_vision.slots == 23
    assert streamed.used <= 24 * GiB < streamed.used + streamed.expert_bytes
    # A tiny tower (the test checkpoint's): a round of tiles outweighs its blocks, so it stays whole.
    small, small_text = VisionConfig.from_hf(raw), TextConfig.from_hf(raw)
    more = vision_memory(small, 2) - vision_memory(small, 2, streamed=True)
    assert more < 0
    args = dict(vision=vision_memory(small, 2), vision_host=more)
    full = plan_memory(small_text, 2**40, 256, 2, None, **args)
    budget = full.used - full.dense["embeddings"] - (full.experts_total - 2) * full.expert_bytes
    tight = plan_memory(small_text, budget, 256, 2, None, **args)
    assert tight.slots == 2 and list(tight.host_dense) == ["embeddings"] and tight.dense["vision"] == args["vision"]
    # Where everything fits, the tower stays whole on the device.
    full = plan_memory(tcfg, 80 * GiB, 8192, 2, q, vision=extra, vision_host=extra - resident)
    assert full.all_resident and not full.host_dense and full.dense["vision"] == extra


# -- bad input ------------------------------------------------------------------------------------


def _png_claiming(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (the pixels are never there)."""
    noise(4, 4).save(path)
    data = bytearray(path.read_bytes())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "case,words",
    [
        ("missing", ["does not exist"]),
        ("directory", ["is a directory"]),
        ("text", ["not an image"]),
        ("truncated", ["cannot decode image"]),
        ("huge", ["too large"]),
    ],
)
def test_bad_images_are_one_line_errors(tmp_path, multimodal_ckpt, case, words):
    path = tmp_path / "img.png"
    if case == "directory":
        path.mkdir()
    elif case == "text":
        path.write_text("not a picture\n")
    elif case == "truncated":
        noise(200, 200).save(path)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "huge":
        _png_claiming(path, 100_000, 100_000)
    r = run_cli("prompt", "hi", "-m", multimodal_ckpt, "--image", path, "--device", "cpu", "-n", "2")
    assert_user_error(r, *words)


def test_image_with_a_text_only_checkpoint(tmp_path, scout_ckpt):
    noise(20, 20).save(tmp_path / "a.png")
    r = run_cli("prompt", "hi", "-m", scout_ckpt, "--image", tmp_path / "a.png", "--device", "cpu", "-n", "2")
    assert_user_error(r, "text-only")


def test_checkpoint_without_vision_weights(tmp_path, multimodal_ckpt):
    """A multimodal config whose vision tensors were left out: said before generating."""
    from safetensors.torch import load_file, save_file

    from llama4_local.checkpoint import list_tensors

    ckpt = tmp_path / "novision"
    shutil.copytree(multimodal_ckpt, ckpt)
    for shard in {p for n, p in list_tensors(ckpt).items() if n.startswith("vision_model.")}:
        shard = ckpt / shard.name
        tensors = {k: v for k, v in load_file(shard).items() if not k.startswith("vision_model.")}
        save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("vision_model.")}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    noise(20, 20).save(tmp_path / "a.png")
    r = run_cli("prompt", "hi", "-m", ckpt, "--image", tmp_path / "a.png", "--device", "cpu", "-n", "2")
    assert_user_error(r, "vision")

"""Llama 4's vision tower: image tiles -> features in the text model's embedding space.

Per tile: 14x14 patches unfolded and projected (no bias), a class token appended (last), a
learned position embedding, pre-LayerNorm, ViT blocks (LayerNorm, attention with biases and a
2D rotary embedding over the patch grid, GELU MLP), post-LayerNorm, the class token dropped;
then pixel shuffle (2x2 neighbouring patches -> one token of 4x the width), the adapter MLP
(GELU after both layers) and the projector into the text hidden size. The features replace the
`<|patch|>` token embeddings of the prompt, tile by tile in prompt order.

Parameter names are the checkpoint's own (`vision_model.*`, `multi_modal_projector.*`), so
loading is a name-for-name copy. The tower runs in the text model's dtype (bf16 by default;
its weights are small and never quantized).

Beside an expert cache on a GPU (a 24 GB card) the 34 ViT blocks' weights (1.5 GiB of Scout's
1.6) can stay in host RAM: each block is copied into one block's room on the device when it
runs, every tile of a round going through it before the next is copied (`load_vision(...,
streamed=True)`): ~1.5 GB over PCIe an image, in exchange for ~23 more expert slots all the
time. Same arithmetic as the resident tower.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpoint, list_tensors
from .config import read_json
from .errors import UserError
from .model import linear

LN_EPS = 1e-5  # the reference builds its LayerNorms with torch's default eps
STREAM_TILES = 32  # tiles per round through a streamed tower's blocks (each round copies every block once)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    rope_theta: float
    text_hidden_size: int
    image_token_id: int | None  # <|patch|>: the positions image features are written into

    @classmethod
    def from_dir(cls, model_dir: Path) -> VisionConfig | None:
        """The vision config of the checkpoint in `model_dir` (None for a text-only one)."""
        path = Path(model_dir) / "config.json"
        return cls.from_hf(read_json(path), str(path))

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> VisionConfig | None:
        """The vision part of a Llama4ForConditionalGeneration config; None for text-only configs."""
        v = raw.get("vision_config") if isinstance(raw, dict) else None
        if not isinstance(v, dict):
            return None
        text = raw.get("text_config") or {}
        try:
            rope = v.get("rope_parameters") or {}
            cfg = cls(
                hidden_size=int(v["hidden_size"]),
                num_layers=int(v["num_hidden_layers"]),
                num_heads=int(v["num_attention_heads"]),
                intermediate_size=int(v["intermediate_size"]),
                image_size=int(v["image_size"]),
                patch_size=int(v["patch_size"]),
                pixel_shuffle_ratio=float(v.get("pixel_shuffle_ratio", 0.5)),
                projector_input_dim=int(v["projector_input_dim"]),
                projector_output_dim=int(v["projector_output_dim"]),
                vision_output_dim=int(v["vision_output_dim"]),
                rope_theta=float(rope.get("rope_theta", v.get("rope_theta", 10000.0))),
                text_hidden_size=int(text["hidden_size"]),
                image_token_id=raw.get("image_token_index", raw.get("image_token_id")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source}: vision_config is malformed ({e!r}); is it a Llama 4 config?") from None
        cfg._validate(source)
        return cfg

    def _validate(self, source: str) -> None:
        side = self.image_size // self.patch_size
        shuffled = round(1 / self.pixel_shuffle_ratio)
        problems = []
        if self.image_size % self.patch_size or side % shuffled:
            problems.append(f"image_size {self.image_size} does not split into {self.patch_size}-pixel patches")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            problems.append(f"hidden_size {self.hidden_size} / {self.num_heads} heads is not a multiple of 4")
        if self.intermediate_size != self.hidden_size * shuffled**2:
            problems.append("intermediate_size must equal hidden_size / pixel_shuffle_ratio^2")
        if self.projector_input_dim != self.projector_output_dim:
            problems.append("projector_input_dim and projector_output_dim differ")
        if self.vision_output_dim != self.projector_output_dim:
            problems.append("vision_output_dim and projector_output_dim differ")
        if self.image_token_id is None:
            problems.append("config.json has no image_token_index")
        if problems:
            raise UserError(f"{source}: vision_config is inconsistent: {problems[0]}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """<|patch|> tokens one tile becomes after pixel shuffle (Scout: 144)."""
        return int(self.patches_per_side**2 * self.pixel_shuffle_ratio**2)


def _p(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class _Linear(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.weight = _p(d_out, d_in)
        self.bias = _p(d_out) if bias else None

    def forward(self, x):
        # model.linear: float32 products for bf16/fp16 on the CPU (its low-precision GEMM is slow).
        y = linear(x.flatten(0, -2), self.weight).unflatten(0, x.shape[:-1])
        return y if self.bias is None else y + self.bias


class _LayerNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight, self.bias = _p(d), _p(d)

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, LN_EPS)


def rope_2d(cfg: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [patches + 1, head_dim / 2] for the 2D rotary embedding (class token: angle 0).

    Rotation pair k of a head turns by (x + 1) * f_k for the first half of the pairs and by
    (y + 1) * f_k for the second, (x, y) the patch's column and row, f_k = theta^(-4k / head_dim).
    """
    side = cfg.patches_per_side
    quarter = cfg.hidden_size // cfg.num_heads // 4
    f = cfg.rope_theta ** (-torch.arange(quarter, dtype=torch.float32) * 4 / (cfg.hidden_size // cfg.num_heads))
    idx = torch.arange(side * side)
    x, y = (idx % side + 1).float(), (idx // side + 1).float()
    angles = torch.cat([x[:, None] * f, y[:, None] * f], dim=1)
    angles = torch.cat([angles, torch.zeros(1, 2 * quarter)])  # the class token, last
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [N, L, H, hd] in float32 (pairs (2k, 2k+1), as complex numbers)."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (_Linear(d, d, True) for _ in range(4))

    def forward(self, x, cos, sin):
        n, length, d = x.shape
        q = self.q_proj(x).view(n, length, self.heads, -1)
        k = self.k_proj(x).view(n, length, self.heads, -1)
        v = self.v_proj(x).view(n, length, self.heads, -1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(o.transpose(1, 2).reshape(n, length, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = _Linear(cfg.hidden_size, cfg.intermediate_size, True)
        self.fc2 = _Linear(cfg.intermediate_size, cfg.hidden_size, True)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_layernorm = _LayerNorm(cfg.hidden_size)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = _LayerNorm(cfg.hidden_size)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, side*side, C] -> [N, side*side*ratio^2, C/ratio^2]: neighbouring patches folded into channels."""
    n, length, c = x.shape
    side = int(round(length**0.5))
    r = int(round(1 / ratio))
    x = x.view(n, side, side // r, c * r).transpose(1, 2)  # columns folded
    x = x.reshape(n, side // r, side // r, c * r * r).transpose(1, 2)  # then rows
    return x.reshape(n, -1, c * r * r)


class _Adapter(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.fc1 = _Linear(cfg.intermediate_size, cfg.projector_input_dim, False)
        self.mlp.fc2 = _Linear(cfg.projector_output_dim, cfg.projector_output_dim, False)

    def forward(self, x):
        return F.gelu(self.mlp.fc2(F.gelu(self.mlp.fc1(x))))


class VisionTower(nn.Module):
    """The modules under `vision_model.` in a checkpoint."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embedding = nn.Module()
        self.patch_embedding.linear = _Linear(3 * p * p, d, False)
        self.class_embedding = _p(d)
        self.positional_embedding_vlm = _p(cfg.patches_per_side**2 + 1, d)
        self.layernorm_pre = _LayerNorm(d)
        self.layernorm_post = _LayerNorm(d)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.vision_adapter = _Adapter(cfg)


class Vision(nn.Module):
    """Vision tower + projector; `forward(pixels)` -> [tiles * tokens_per_tile, text hidden]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTower(cfg)
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear_1 = _Linear(cfg.vision_output_dim, cfg.text_hidden_size, False)
        cos, sin = rope_2d(cfg)
        self.register_buffer("rope_cos", cos.to("meta"), persistent=False)
        self.register_buffer("rope_sin", sin.to("meta"), persistent=False)
        self.slot: VisionBlock | None = None  # streamed: the device's room for one block

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, tiles_per_pass: int = 8) -> torch.Tensor:
        """Features of every tile, in order; tiles go through the tower a few at a time (bounded
        memory), a streamed tower's blocks copied in once for every round of tiles (stream_round)."""
        group = tiles_per_pass if self.slot is None else stream_round(tiles_per_pass)
        out = [self._tiles(pixels[i : i + group], tiles_per_pass) for i in range(0, pixels.shape[0], group)]
        return torch.cat(out).flatten(0, 1)

    def _tiles(self, pixels: torch.Tensor, tiles_per_pass: int) -> torch.Tensor:
        vm, cfg = self.vision_model, self.cfg
        w = vm.patch_embedding.linear.weight
        xs = []
        for i in range(0, pixels.shape[0], tiles_per_pass):
            x = F.unfold(
                pixels[i : i + tiles_per_pass].to(device=w.device, dtype=w.dtype), cfg.patch_size, stride=cfg.patch_size
            )
            x = vm.patch_embedding.linear(x.transpose(1, 2))  # [N, patches, d]
            x = torch.cat([x, vm.class_embedding.expand(x.shape[0], 1, -1)], dim=1)
            xs.append(vm.layernorm_pre(x + vm.positional_embedding_vlm))
        for block in vm.model.layers:
            block = self._on_device(block)
            for j, x in enumerate(xs):  # each pass's input freed as its output replaces it
                xs[j] = block(x, self.rope_cos, self.rope_sin)
        out = []
        for x in xs:
            x = vm.layernorm_post(x)[:, :-1]
            x = vm.vision_adapter(pixel_shuffle(x, cfg.pixel_shuffle_ratio))
            out.append(self.multi_modal_projector.linear_1(x))
        return torch.cat(out)

    def make_room(self, dtype: torch.dtype, device: torch.device) -> None:
        """Stream the blocks (wherever their weights lie) through one block's room on `device`."""
        self.slot = VisionBlock(self.cfg)
        for name, p in list(self.slot.named_parameters()):
            mod, _, attr = name.rpartition(".")
            room = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False)
            setattr(self.slot.get_submodule(mod), attr, room)

    def _on_device(self, block: VisionBlock) -> VisionBlock:
        """`block` itself, or, streamed, the device's block room holding a copy of its weights
        (queued after the previous block's work on the same stream, so nothing reads it early)."""
        if self.slot is None:
            return block
        for room, weights in zip(self.slot.parameters(), block.parameters(), strict=True):
            room.copy_(weights)
        return self.slot


def vision_checkpoint(model_dir: Path) -> Checkpoint | None:
    """The vision tensors of a checkpoint, by their own names; None if it has none."""
    prefixes = ("vision_model.", "multi_modal_projector.")
    files = {n: p for n, p in list_tensors(model_dir).items() if n.startswith(prefixes)}
    if not files:
        return None
    return Checkpoint(root=Path(model_dir), files=files, names={n: n for n in files})


def vision_parameters(cfg: VisionConfig) -> int:
    """Parameters of the vision tower and projector, from the config alone (Scout: 0.87 B)."""
    d, m, p = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
    tower = 3 * p * p * d + d + (cfg.patches_per_side**2 + 1) * d + 4 * d + cfg.num_layers * _block_parameters(cfg)
    adapter = m * cfg.projector_input_dim + cfg.projector_output_dim**2
    return tower + adapter + cfg.vision_output_dim * cfg.text_hidden_size


def load_vision(
    ckpt: Checkpoint, cfg: VisionConfig, dtype: torch.dtype, device: torch.device, streamed: bool = False
) -> Vision:
    """Build the vision tower from a `vision_checkpoint` (names and shapes checked as for the text
    model); `streamed`: the ViT blocks' weights stay in host RAM (mapped views where the dtype
    matches) and are copied into one block's room on `device` as they run."""
    from .loader import assign_weights

    vision = Vision(cfg)
    host = frozenset(n for n, _ in vision.named_parameters() if n.startswith(BLOCKS)) if streamed else frozenset()
    assign_weights(vision, ckpt, dtype, device, host)
    if streamed:
        vision.make_room(dtype, device)
    cos, sin = rope_2d(cfg)
    vision.rope_cos, vision.rope_sin = cos.to(device), sin.to(device)
    return vision.eval()


BLOCKS = "vision_model.model.layers."


def _block_parameters(cfg: VisionConfig) -> int:
    d, m = cfg.hidden_size, cfg.intermediate_size
    return 4 * (d * d + d) + (d * m + m) + (m * d + d) + 4 * d


def vision_plan_bytes(cfg: VisionConfig, elt: int) -> tuple[int, int]:
    """(device bytes of the whole tower with a pass's activations, how many of them streaming its
    blocks leaves in host RAM instead): offload.plan_memory's `vision` and `vision_host`."""
    whole = vision_memory(cfg, elt)
    return whole, whole - vision_memory(cfg, elt, streamed=True)


def stream_round(tiles_per_pass: int) -> int:
    """Tiles a streamed tower takes through each block before the next is copied in: about
    STREAM_TILES, in whole passes, so its passes hold the tiles a resident tower's do (the same
    products' shapes, so the same features bit for bit: BLAS kernels may round a product of other
    rows otherwise)."""
    return max(1, STREAM_TILES // tiles_per_pass) * tiles_per_pass


def vision_memory(cfg: VisionConfig, elt: int, tiles_per_pass: int = 8, streamed: bool = False) -> int:
    """Device bytes the vision tower needs: its weights plus the activations of one pass of tiles;
    `streamed`: one block's weights of the ViT blocks' and the residuals of a round of tiles."""
    length = cfg.patches_per_side**2 + 1
    acts = tiles_per_pass * length * (4 * cfg.hidden_size + cfg.intermediate_size) * 4
    scores = tiles_per_pass * cfg.num_heads * length * length * 4  # if attention is not fused
    weights = vision_parameters(cfg)
    if streamed:
        weights -= (cfg.num_layers - 1) * _block_parameters(cfg)
        acts += (stream_round(tiles_per_pass) - tiles_per_pass) * length * cfg.hidden_size * elt  # the round's
    return weights * elt + acts + scores

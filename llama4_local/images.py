"""Images for Llama 4: reading them, cutting them into tiles, and their place in the prompt.

Preprocessing follows what Llama 4 was trained with (and what transformers'
`Llama4ImageProcessor` computes, which the tests compare against pixel for pixel): the image
is resized without distortion to the best-fitting canvas of up to `max_patches` square tiles
(never upscaled past one tile), padded with black on the right and bottom, cut into tiles
row by row, and, when there is more than one tile, followed by the whole image squeezed into
one tile (the global view). Values are rescaled by 1/255 and normalised in bfloat16.

In the prompt an image is `<|image_start|>`, then per tile row the tiles' patch tokens with
`<|tile_x_separator|>` between tiles and `<|tile_y_separator|>` after the row, then `<|image|>`
and the global view's patch tokens, then `<|image_end|>`; a one-tile image is only
`<|image_start|><|image|>` + its patch tokens + `<|image_end|>`.

Files are decoded by Pillow (JPEG, PNG, WebP, and whatever else it reads), EXIF orientation
applied, transparency composited onto white.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import read_json
from .errors import UserError

MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit (2 x its warning threshold)
MAX_FILE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ImageSettings:
    """How a checkpoint wants its images prepared (its preprocessor_config.json)."""

    tile: int = 336
    max_patches: int = 16
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale: float = 1 / 255
    resize_to_max_canvas: bool = False

    @classmethod
    def from_dir(cls, model_dir: Path, tile: int) -> ImageSettings:
        """Read preprocessor_config.json if the checkpoint has one; `tile` is the vision tower's image size."""
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            return cls(tile=tile)
        raw = read_json(path)
        size = raw.get("size") or {}
        h, w = size.get("height", tile), size.get("width", tile)
        if h != w or h != tile:
            raise UserError(
                f"{path}: tile size {h}x{w} does not match the vision tower's image_size {tile}; "
                "the checkpoint's files do not belong together"
            )
        resample = raw.get("resample", 2)
        if resample not in (2, "bilinear", "BILINEAR"):
            raise UserError(f"{path}: resample {resample!r} is not supported (Llama 4 uses 2, bilinear)")
        try:
            return cls(
                tile=tile,
                max_patches=int(raw.get("max_patches", 16)),
                mean=tuple(float(x) for x in raw.get("image_mean", (0.5, 0.5, 0.5))),
                std=tuple(float(x) for x in raw.get("image_std", (0.5, 0.5, 0.5))),
                rescale=float(raw.get("rescale_factor", 1 / 255)),
                resize_to_max_canvas=bool(raw.get("resize_to_max_canvas", False)),
            )
        except (TypeError, ValueError) as e:
            raise UserError(f"{path} has a malformed value ({e})") from None


@dataclass
class PreparedImage:
    """One image ready for the vision tower."""

    source: str
    size: tuple[int, int]  # (height, width) as read, after EXIF rotation
    grid: tuple[int, int]  # tiles (rows, columns); (1, 1) means no global view
    pixels: torch.Tensor  # [tiles (+1 global), 3, tile, tile] bfloat16

    @property
    def tiles(self) -> int:
        return self.pixels.shape[0]


# -- reading ------------------------------------------------------------------------------------


def read_image(path: str | Path):
    """Decode an image file into an RGB PIL image; a one-line UserError for anything wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"image {path} does not exist")
    if path.is_dir():
        raise UserError(f"image {path} is a directory; give an image file (JPEG, PNG or WebP)")
    try:
        nbytes = path.stat().st_size
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e.strerror}") from None
    if nbytes > MAX_FILE_BYTES:
        raise UserError(f"image {path} is {nbytes / 2**20:.0f} MiB; images over 256 MiB are refused, shrink it")
    return decode_image(path, str(path))


def decode_image(source, name: str):
    """Decode an image (a path or a binary file object) into an RGB PIL image, refusing decompression bombs."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2  # Pillow raises past twice this
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise UserError(f"image {name} is {w}x{h} pixels, too large to decode safely; shrink it")
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise UserError(f"image {name} is too large to decode safely; shrink it") from None
    except UnidentifiedImageError:
        raise UserError(f"{name} is not an image Pillow can read (JPEG, PNG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot decode image {name}: {e}; is the file complete?") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def to_rgb(im):
    """RGB, with any transparency composited onto white (what Llama 4's processor does)."""
    from PIL import Image

    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


# -- tiling -------------------------------------------------------------------------------------


def canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """Every canvas (height, width) of up to `max_tiles` tiles, in the order ties are broken.

    Grouped by aspect ratio in order of first appearance, walking tile counts downwards.
    """
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return [(r * tile, c * tile) for group in by_ratio.values() for r, c in group]


def best_canvas(size: tuple[int, int], options: list[tuple[int, int]], to_max: bool = False) -> tuple[int, int]:
    """The canvas an image of `size` fits best: the smallest upscale, else the mildest downscale.

    Ties go to the smallest area (the least padding). float32 arithmetic, as the reference.
    """
    opts = torch.tensor(options)
    h, w = size
    scale_h, scale_w = opts[:, 0] / h, opts[:, 1] / w
    scales = torch.minimum(scale_h, scale_w)
    up = scales[scales >= 1]
    if len(up):
        chosen = up.max() if to_max else up.min()
    else:
        chosen = scales[scales < 1].max()
    fits = opts[scales == chosen]
    best = fits[torch.argmin(fits[:, 0] * fits[:, 1])]
    return int(best[0]), int(best[1])


def fit_without_distortion(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The largest (height, width) with the image's aspect ratio inside `target`."""
    (h, w), (th, tw) = size, target
    sw, sh = tw / w, th / h
    if sw < sh:
        return max(min(math.floor(h * sw), th), 1), max(tw, 1)
    return max(th, 1), max(min(math.floor(w * sh), tw), 1)


def _native_uint8_resize() -> bool:
    # torchvision resizes uint8 natively where torch has a fast kernel for it, else in float32.
    cap = torch.backends.cpu.get_cpu_capability()
    return cap in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with antialiasing of uint8 [N, 3, H, W]; result uint8."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    if _native_uint8_resize():
        return F.interpolate(img, size=list(size), mode="bilinear", align_corners=False, antialias=True)
    out = F.interpolate(img.float(), size=list(size), mode="bilinear", align_corners=False, antialias=True)
    return out.round_().to(torch.uint8)


def normalize(img: torch.Tensor, s: ImageSettings) -> torch.Tensor:
    """uint8 -> bfloat16 in [-1, 1] (for mean = std = 0.5), computed in bfloat16 as Llama 4's reference."""
    x = img.to(torch.bfloat16) * s.rescale
    mean = torch.tensor(s.mean, dtype=torch.bfloat16).view(-1, 1, 1)
    std = torch.tensor(s.std, dtype=torch.bfloat16).view(-1, 1, 1)
    return x.sub(mean).div_(std)


def prepare(image, settings: ImageSettings, source: str = "image") -> PreparedImage:
    """An RGB PIL image -> tiles of normalised pixels."""
    w, h = image.size
    arr = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3)
    img = arr.permute(2, 0, 1).contiguous().unsqueeze(0)  # [1, 3, H, W]
    size = (img.shape[-2], img.shape[-1])
    t = settings.tile
    canvas = best_canvas(size, canvases(settings.max_patches, t), settings.resize_to_max_canvas)
    target = canvas
    if not settings.resize_to_max_canvas:  # never upscale past one tile
        target = (min(max(size[0], t), canvas[0]), min(max(size[1], t), canvas[1]))
    fitted = resize(img, fit_without_distortion(size, target))
    padded = F.pad(fitted, (0, canvas[1] - fitted.shape[-1], 0, canvas[0] - fitted.shape[-2]), value=0)
    x = normalize(padded, settings)
    rows, cols = canvas[0] // t, canvas[1] // t
    tiles = x.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
    if rows * cols > 1:
        whole = normalize(resize(img, (t, t)), settings)
        tiles = torch.cat([tiles, whole], dim=0)
    return PreparedImage(source=source, size=size, grid=(rows, cols), pixels=tiles.contiguous())


def load_image(path: str | Path, settings: ImageSettings) -> PreparedImage:
    return prepare(read_image(path), settings, source=str(path))


# -- the prompt ---------------------------------------------------------------------------------

IMAGE_TOKENS = {
    "start": "<|image_start|>",
    "end": "<|image_end|>",
    "image": "<|image|>",
    "patch": "<|patch|>",
    "tile_x": "<|tile_x_separator|>",
    "tile_y": "<|tile_y_separator|>",
}


@dataclass(frozen=True)
class ImageTokenIds:
    start: int
    end: int
    image: int
    patch: int
    tile_x: int
    tile_y: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ImageTokenIds:
        ids = {k: tokenizer.token_id(v) for k, v in IMAGE_TOKENS.items()}
        missing = [IMAGE_TOKENS[k] for k, v in ids.items() if v is None]
        if missing:
            raise UserError(
                f"the tokenizer has no {', '.join(missing)} token; this checkpoint's tokenizer cannot take images"
            )
        return cls(**ids)


def image_layout(grid: tuple[int, int], per_tile: int, t: ImageTokenIds) -> list[int]:
    """The token ids one image occupies in the prompt."""
    rows, cols = grid
    ids = [t.start]
    if rows * cols > 1:
        for _ in range(rows):
            for c in range(cols):
                ids += [t.patch] * per_tile
                if c < cols - 1:
                    ids.append(t.tile_x)
            ids.append(t.tile_y)
    ids.append(t.image)
    ids += [t.patch] * per_tile
    ids.append(t.end)
    return ids


def expand_images(ids: list[int], images: list[PreparedImage], per_tile: int, t: ImageTokenIds) -> list[int]:
    """Replace the i-th `<|image|>` placeholder (as the chat template writes it) by image i's layout."""
    n = sum(1 for i in ids if i == t.image)
    if n != len(images):
        raise UserError(f"the prompt has {n} image placeholder(s) (<|image|>) for {len(images)} image(s)")
    out: list[int] = []
    it = iter(images)
    for i in ids:
        if i == t.image:
            out += image_layout(next(it).grid, per_tile, t)
        else:
            out.append(i)
    return out


class ImageReader:
    """Images for one checkpoint: its tile settings, its image tokens and its tokens per tile.

    Built from config.json, preprocessor_config.json and the tokenizer only, so a bad image or a
    text-only checkpoint is reported before any weight is loaded.
    """

    def __init__(self, model_dir: Path, tokenizer):
        from .vision import VisionConfig

        vcfg = VisionConfig.from_dir(model_dir)
        if vcfg is None:
            raise UserError(
                f"{model_dir} is a text-only checkpoint (no vision_config); images need a Llama 4 checkpoint "
                "saved as Llama4ForConditionalGeneration"
            )
        self.settings = ImageSettings.from_dir(model_dir, vcfg.image_size)
        self.tokens = ImageTokenIds.from_tokenizer(tokenizer)
        if self.tokens.patch != vcfg.image_token_id:
            raise UserError(
                f"config.json's image_token_index {vcfg.image_token_id} is not the tokenizer's <|patch|> "
                f"({self.tokens.patch}); the checkpoint's files do not belong together"
            )
        self.per_tile = vcfg.tokens_per_tile

    def load(self, path: str | Path) -> PreparedImage:
        return load_image(path, self.settings)

    def load_bytes(self, data: bytes, name: str = "image") -> PreparedImage:
        """An image sent as bytes (a server's data URL)."""
        import io

        return prepare(decode_image(io.BytesIO(data), name), self.settings, source=name)

    def tokens_for(self, image: PreparedImage) -> int:
        return len(image_layout(image.grid, self.per_tile, self.tokens))

    def expand(self, ids: list[int], images: list[PreparedImage]) -> list[int]:
        return expand_images(ids, images, self.per_tile, self.tokens)

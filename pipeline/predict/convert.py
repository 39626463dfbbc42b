"""Images -> the model's 28x28 input: the one place an image becomes what the model takes.

Fashion-MNIST's own conversion (Xiao et al., arXiv:1708.07747, section 2), one small function a
step: trim the edges close to the corners' colour, resize the longest edge to 28, sharpen, extend
the short edge to 28 with the image centred, negate, 8-bit grey. Two additions for photos, said
here: a tinted background is whitened first (each channel scaled so the background becomes white),
and the polarity is read from the border (a dark background is not negated), so no flag is needed.

`prepare` decides per image (`auto`): a 28x28 grey image on a dark background is already in the
dataset's format and is taken as it is; anything else is converted. Used by `pipeline predict`
(inputs.read_source) and by the served image model (pipeline.predict.served). Pillow and numpy only.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps

PREPROCESS_MODES = ("auto", "fashion-mnist", "none")
TRIM_FUZZ = 0.05 * 255  # "close to the corner pixels' colour": within 5% of the intensity range (per channel)
WORK_EDGE = 6 * 28  # trimming needs no more detail than 6 pixels per output pixel: larger images are reduced first
SHARPEN = ImageFilter.UnsharpMask(radius=1.0, percent=50, threshold=0)  # a Gaussian of radius/sigma 1.0
AS_IS = "as-is"
DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclass
class Prepared:
    pixels: np.ndarray  # uint8 (H, W), light garment on black, as the model takes it
    steps: list[str] = field(default_factory=list)  # what was done, for the table's preprocessing column

    @property
    def note(self) -> str:
        return ",".join(self.steps) or AS_IS


# --------------------------------------------------------------------------- opening and decoding


def open_image(source: str | os.PathLike | bytes) -> tuple[Image.Image, list[str]]:
    """A file or encoded bytes -> a loaded, upright Pillow image, with what decoding did (EXIF, frames).

    Pillow's pixel limit (DecompressionBombError) holds: a huge image is refused before it is decoded.
    """
    stream = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    steps = []
    with Image.open(stream) as image:
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            image.seek(0)
            steps.append(f"first of {frames} frames")
        if image.format == "JPEG" and image.mode in ("L", "RGB", "YCbCr"):
            image.draft(image.mode, (4 * WORK_EDGE, 4 * WORK_EDGE))  # big photos decode at a reduced scale
        orientation = image.getexif().get(0x0112, 1)
        image.load()
        upright = ImageOps.exif_transpose(image)
    if orientation not in (1, None):
        steps.append("rotated (EXIF)")
    return upright, steps


def decode(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """Any mode -> 8-bit "L" or "RGB": 16-bit scaled, CMYK and palettes converted, alpha composited.

    Transparency becomes the background (see transparency_is_white), so a garment drawn only in the
    alpha channel (all its pixels one colour) stands out either way.
    """
    steps = []
    if image.mode in DEEP_MODES:
        wide = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode.startswith("I;16") or wide.max() > 255 else 1.0
        image = Image.fromarray(np.clip(wide / scale, 0, 255).astype(np.uint8))
        steps.append("16-bit" if scale > 1 else "32-bit")
    if image.mode == "CMYK":
        steps.append("CMYK")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if alpha.min() < 255:
            white = transparency_is_white(rgba)
            fill = (255, 255, 255, 255) if white else (0, 0, 0, 255)
            image = Image.alpha_composite(Image.new("RGBA", image.size, fill), rgba)
            steps.append("transparency on " + ("white" if white else "black"))
    if image.mode not in ("L", "RGB"):
        image = image.convert("L" if image.mode in ("1", "LA", "La") else "RGB")
    return image, steps


def transparency_is_white(rgba: Image.Image) -> bool:
    """What colour transparent pixels become: the opaque border's, if the border is mostly opaque (a
    photo with a transparent strip); else, for a cut-out garment, the opposite of the garment's colour."""
    pixels = border(rgba)
    opaque = pixels[pixels[:, 3] > 127, :3]
    if len(opaque) * 2 >= len(pixels):
        return float(np.median(opaque.mean(axis=1))) > 127
    array = np.asarray(rgba)
    garment = array[..., :3][array[..., 3] > 127]
    return not (garment.size > 0 and garment.mean() > 127)


# --------------------------------------------------------------------------- the dataset's conversion, step by step


def reduce_large(image: Image.Image) -> Image.Image:
    """Box-reduce an image whose longest edge is over WORK_EDGE by an integer factor: the output is 28 pixels."""
    factor = max(image.size) // WORK_EDGE
    return image.reduce(factor) if factor > 1 else image


def border(image: Image.Image) -> np.ndarray:
    """The outermost rows and columns' pixels, (n, channels): cropped out, the rest is never copied."""
    w, h = image.size
    strips = [image.crop(box) for box in ((0, 0, w, 1), (0, h - 1, w, h), (0, 0, 1, h), (w - 1, 0, w, h))]
    return np.concatenate([np.asarray(s).reshape(-1, len(image.getbands())) for s in strips])


def background_colour(image: Image.Image) -> np.ndarray:
    """The corners' colour: the median of the four corner pixels (one value per channel)."""
    w, h = image.size
    corners = [image.getpixel(xy) for xy in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1))]
    return np.median(np.asarray(corners, dtype=np.float32).reshape(4, -1), axis=0)


def light_background(image: Image.Image) -> bool:
    """The polarity, from the border: most of it light means a dark garment on a light background."""
    return float(np.median(border(image).mean(axis=1))) > 127


def per_channel(image: Image.Image, tables: list[list[int]]) -> Image.Image:
    """Each channel through its own 256-entry table (Pillow's point(), in C)."""
    return image.point([value for table in tables for value in table])


def whiten(image: Image.Image, background: np.ndarray, light: bool) -> Image.Image:
    """Scale each channel so the background becomes pure white (light) or black (dark): a tint goes."""
    levels = np.arange(256, dtype=np.float32)
    tables = []
    for level in background:
        if light:
            scaled = levels * (255.0 / max(float(level), 1.0))
        else:
            scaled = (levels - level) * (255.0 / max(255.0 - float(level), 1.0))
        tables.append(np.clip(scaled + 0.5, 0, 255).astype(np.uint8).tolist())
    return per_channel(image, tables)


def trim_box(image: Image.Image, background: np.ndarray) -> tuple[int, int, int, int] | None:
    """The box (left, top, right, bottom) of the pixels not close to the background colour; None: one flat colour."""
    fill = tuple(int(round(v)) for v in background) if len(background) > 1 else int(round(background[0]))
    difference = ImageChops.difference(image, Image.new(image.mode, image.size, fill))
    far = [255 if v > TRIM_FUZZ else 0 for v in range(256)]
    return per_channel(difference, [far] * len(background)).getbbox()


def resize_longest(image: Image.Image, edge: int) -> Image.Image:
    """The longest edge to `edge` pixels, the proportions kept (the short edge at least 1).

    Lanczos (antialiased) where the paper subsampled: a photo's fine texture would alias otherwise.
    """
    width, height = image.size
    scale = edge / max(width, height)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(target, Image.Resampling.LANCZOS) if target != image.size else image


def sharpen(image: Image.Image) -> Image.Image:
    return image.filter(SHARPEN)


def extend(image: Image.Image, size: tuple[int, int], fill: int | tuple[int, ...]) -> Image.Image:
    """The short edge extended to the target with the background colour, the image centred."""
    h, w = size
    if image.size == (w, h):
        return image
    canvas = Image.new(image.mode, (w, h), fill)
    canvas.paste(image, ((w - image.width) // 2, (h - image.height) // 2))
    return canvas


def negate(image: Image.Image) -> Image.Image:
    return ImageOps.invert(image)


def to_grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.uint8)


def fashion_mnist(image: Image.Image, size: tuple[int, int], polarity: str = "auto") -> Prepared:
    """Fashion-MNIST's conversion of a decoded "L" or "RGB" image; polarity "auto", "light" or "dark" background."""
    steps = []
    picture = reduce_large(image)
    light = light_background(picture) if polarity == "auto" else polarity == "light"
    background = background_colour(picture)
    extreme = 255.0 if light else 0.0
    if np.abs(background - extreme).max() > TRIM_FUZZ / 2:
        picture = whiten(picture, background, light)
        steps.append("whitened" if light else "darkened")
        background = np.full_like(background, extreme)
    box = trim_box(picture, background)
    if box is None:
        steps.append("nothing to trim (one flat colour)")
    elif box != (0, 0, *picture.size):
        picture = picture.crop(box)
        steps.append("trimmed")
    picture = sharpen(resize_longest(picture, max(size)))
    fill = 255 if light else 0
    picture = extend(picture, size, fill if picture.mode == "L" else (fill,) * 3)
    if light:
        picture = negate(picture)
        steps.append("inverted")
    return Prepared(to_grey(picture), steps)


def plain(image: Image.Image, size: tuple[int, int]) -> Prepared:
    """--preprocess none: grey, resized to the model's size if it is not (stretched), nothing else."""
    h, w = size
    grey = image.convert("L")
    if grey.size == (w, h):
        return Prepared(to_grey(grey), [])
    return Prepared(to_grey(grey.resize((w, h), Image.Resampling.LANCZOS)), ["resized"])


def dataset_like(image: Image.Image, size: tuple[int, int]) -> bool:
    """Already in Fashion-MNIST's format: the model's size, grey (one channel, or three equal ones, as a
    dataset image saved as RGB or as a palette GIF), a dark background."""
    h, w = size
    if image.size != (w, h):
        return False
    if image.mode == "RGB":
        channels = np.asarray(image)
        if not ((channels[..., 0] == channels[..., 1]) & (channels[..., 1] == channels[..., 2])).all():
            return False
    return not light_background(image)


def prepare(image: Image.Image, size: tuple[int, int] = (28, 28), preprocess: str = "auto", invert: bool = False):
    """A loaded image -> Prepared: `auto` takes a dataset-like image as it is and converts the rest.

    `fashion-mnist` always converts; `none` only decodes and resizes. `invert` (the old flag) forces
    the conversion with a light background.
    """
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess {preprocess!r}; expected one of {', '.join(PREPROCESS_MODES)}")
    decoded, steps = decode(image)
    if invert:
        done = fashion_mnist(decoded, size, polarity="light")
    elif preprocess == "none":
        done = plain(decoded, size)
    elif preprocess == "auto" and dataset_like(decoded, size):
        done = Prepared(to_grey(decoded), [])
    else:
        done = fashion_mnist(decoded, size)
    done.steps[:0] = steps
    return done


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit grey array as PNG file bytes (the served model's input example, tests' payloads)."""
    stream = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(stream, format="PNG")
    return stream.getvalue()


def load(source: str | os.PathLike | bytes, size: tuple[int, int] = (28, 28), preprocess: str = "auto", invert=False):
    """A file or encoded bytes -> Prepared: open (EXIF, first frame), then prepare."""
    image, steps = open_image(source)
    done = prepare(image, size, preprocess, invert)
    done.steps[:0] = steps
    return done

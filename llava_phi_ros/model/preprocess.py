"""CLIP image preprocessing for LLaVA-Phi, bit-exact with transformers' PIL CLIPImageProcessor.

Pipeline (reference `process_images` with image_aspect_ratio "pad"): convert to RGB, pad to a
square with the mean colour, resize the shortest edge (PIL bicubic), centre crop, rescale by
1/255, normalise. numpy and Pillow only: no torch or transformers at run time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL filter ids (NEAREST 0, LANCZOS 1, BILINEAR 2, BICUBIC 3, BOX 4, HAMMING 5) as ints:
# Image.Resampling needs Pillow >= 9.1 and Ubuntu 22.04 (JetPack 6) ships 9.0.
BICUBIC = 3


class ImagePreprocessError(ValueError):
    """An image that cannot be preprocessed (empty, unsupported array shape or dtype)."""


class ImageLoadError(ImagePreprocessError):
    """An image file that cannot be read or decoded."""


class PreprocessConfigError(ValueError):
    """A preprocessor_config.json that this pipeline cannot reproduce."""


def _triple(value: Any) -> tuple[float, float, float]:
    """A per-channel setting from JSON: a list of 3 floats, or one float for all channels."""
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    return tuple(float(v) for v in values)  # type: ignore[return-value]


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """CLIP preprocessing settings; the defaults are CLIP ViT-L/14-336's."""

    image_size: int = 336  # centre-crop size (square)
    shortest_edge: int = 336
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC
    pad_to_square: bool = True  # the model config's image_aspect_ratio "pad"; no transformers key
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self) -> None:
        """Reject settings that cannot produce an image."""
        if self.image_size <= 0 or self.shortest_edge <= 0:
            raise PreprocessConfigError(f"image_size and shortest_edge must be positive, got "
                                        f"{self.image_size}, {self.shortest_edge}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise PreprocessConfigError(f"image_mean and image_std need 3 values, got "
                                        f"{self.image_mean}, {self.image_std}")
        if any(s <= 0 for s in self.image_std):
            raise PreprocessConfigError(f"image_std must be positive, got {self.image_std}")
        if self.resample not in range(6):
            raise PreprocessConfigError(f"resample must be a PIL filter (0-5), got {self.resample}")

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        """Pad colour: the mean as the reference computes it, (122, 116, 104) for CLIP."""
        return tuple(int(m * 255) for m in self.image_mean)  # type: ignore[return-value]

    @classmethod
    def for_image_size(cls, n: int, **kwargs: Any) -> ImagePreprocessConfig:
        """A config for n x n inputs (tiny test models): shortest edge = crop = n."""
        return cls(image_size=n, shortest_edge=n, **kwargs)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], pad_to_square: bool = True) -> ImagePreprocessConfig:
        """Read a transformers preprocessor_config.json dict (CLIPImageProcessor keys)."""
        size = d.get("size", {"shortest_edge": 336})
        if isinstance(size, Mapping):
            if "shortest_edge" not in size:
                raise PreprocessConfigError(f"only size={{'shortest_edge': N}} (CLIP) is "
                                            f"supported, got size={dict(size)}")
            size = size["shortest_edge"]
        crop = d.get("crop_size", size)
        if isinstance(crop, Mapping):
            if crop.get("height") != crop.get("width") or crop.get("height") is None:
                raise PreprocessConfigError(f"crop_size must be square {{'height': N, "
                                            f"'width': N}}, got {dict(crop)}")
            crop = crop["height"]
        try:
            return cls(
                image_size=int(crop),
                shortest_edge=int(size),
                image_mean=_triple(d.get("image_mean", CLIP_MEAN)),
                image_std=_triple(d.get("image_std", CLIP_STD)),
                rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                resample=int(d.get("resample", BICUBIC)),
                pad_to_square=pad_to_square,
                do_resize=bool(d.get("do_resize", True)),
                do_center_crop=bool(d.get("do_center_crop", True)),
                do_rescale=bool(d.get("do_rescale", True)),
                do_normalize=bool(d.get("do_normalize", True)),
            )
        except PreprocessConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise PreprocessConfigError(f"bad preprocessor config value: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """A preprocessor_config.json dict that transformers' CLIPImageProcessor loads."""
        return {
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": self.shortest_edge},
            "crop_size": {"height": self.image_size, "width": self.image_size},
            "do_convert_rgb": True,
            "do_resize": self.do_resize,
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }


def expand_to_square(img: Image.Image, background_rgb: tuple[int, int, int]) -> Image.Image:
    """Pad an RGB image to a centred square of `background_rgb` (the reference's expand2square)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background_rgb)
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


def _to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    """Validate the input; return it as RGB via Image.convert('RGB') (alpha dropped, as the
    reference; transformers 5's own convert_to_rgb would composite it onto white instead)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImagePreprocessError(f"image array must be uint8, got {image.dtype}")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
            raise ImagePreprocessError(f"image array must be (H, W), (H, W, 1), (H, W, 3) RGB or "
                                       f"(H, W, 4) RGBA, got shape {image.shape}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.size == 0:  # Pillow < 10.2: fromarray raises "tile cannot extend outside image"
            raise ImagePreprocessError(f"image is empty: {image.shape[1]}x{image.shape[0]}")
        image = Image.fromarray(np.ascontiguousarray(image))
    elif not isinstance(image, Image.Image):
        raise ImagePreprocessError(f"image must be a PIL image or a numpy array, got "
                                   f"{type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ImagePreprocessError(f"image is empty: {image.width}x{image.height}")
    try:
        return image.convert("RGB")
    except ValueError as e:  # a few exotic modes (e.g. "La") have no RGB conversion
        raise ImagePreprocessError(f"cannot convert a {image.mode!r} image to RGB: {e}") from e


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(H, W) after a shortest-edge resize; the long side truncated (int()), as transformers."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def center_crop_layout(h: int, w: int, size: int) -> tuple[int, int, int, int, int, int]:
    """A centre crop of (H, W) to (size, size), as transformers does it: (padded H, padded W,
    pad top, pad left, crop top, crop left). A side smaller than size is first zero-padded to
    it, centred with the odd pixel before (ceil); a large enough side is not padded."""
    nh, nw = max(h, size), max(w, size)
    ph, pw = -(-(nh - h) // 2), -(-(nw - w) // 2)  # ceil
    return nh, nw, ph, pw, (h - size) // 2 + ph, (w - size) // 2 + pw


def _center_crop(x: np.ndarray, size: int) -> np.ndarray:
    """Centre crop (C, H, W) to (C, size, size); zero-pads a too small image, as transformers."""
    c, h, w = x.shape
    nh, nw, ph, pw, top, left = center_crop_layout(h, w, size)
    if (nh, nw) != (h, w):
        padded = np.zeros((c, nh, nw), dtype=x.dtype)
        padded[:, ph : ph + h, pw : pw + w] = x
        x = padded
    return x[:, top : top + size, left : left + size]


def preprocess_image(image: Image.Image | np.ndarray,
                     cfg: ImagePreprocessConfig | None = None) -> np.ndarray:
    """PIL image or (H, W, 3) uint8 RGB array -> float32 (3, S, S) CLIP pixel values."""
    cfg = cfg or ImagePreprocessConfig()
    return pixel_values(square_crop(image, cfg), cfg)


def square_crop(image: Image.Image | np.ndarray, cfg: ImagePreprocessConfig) -> np.ndarray:
    """The geometric half of preprocessing: pad, resize, centre crop -> uint8 (3, S, S)."""
    img = _to_pil(image)
    if cfg.pad_to_square:
        img = expand_to_square(img, cfg.background_rgb)
    if cfg.do_resize:
        h, w = _shortest_edge_size(img.height, img.width, cfg.shortest_edge)
        img = img.resize((w, h), resample=cfg.resample, reducing_gap=None)
    x = np.asarray(img).transpose(2, 0, 1)  # (3, H, W) uint8
    if cfg.do_center_crop:
        x = _center_crop(x, cfg.image_size)  # (3, S, S)
    return x


def pixel_values(x: np.ndarray, cfg: ImagePreprocessConfig) -> np.ndarray:
    """The numeric half: uint8 (3, S, S) -> rescaled, normalised float32 (3, S, S)."""
    # Same dtype path as transformers: rescale in float64 then cast, normalise in float32.
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x)


def load_image(path: str | Path) -> Image.Image:
    """Open and decode an image file as RGB (the reference's Image.open(path).convert('RGB'))."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated files fail here
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot load image {str(path)!r}: {e}") from e
    if rgb.width == 0 or rgb.height == 0:
        raise ImageLoadError(f"cannot load image {str(path)!r}: it is empty "
                             f"({rgb.width}x{rgb.height})")
    return rgb

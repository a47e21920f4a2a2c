"""Preprocessing equals transformers' (PIL) CLIPImageProcessor after the reference's padding."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from llava_phi_ros.model.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    ImageLoadError,
    ImagePreprocessConfig,
    ImagePreprocessError,
    PreprocessConfigError,
    expand_to_square,
    load_image,
    preprocess_image,
)

SIZES = [(640, 480), (480, 640), (333, 517), (1, 7), (7, 1), (1920, 1080), (336, 336)]  # (W, H)
MODES = ["RGB", "RGBA", "L"]


def noise_image(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    """Random-noise content, so every pixel of the resize matters."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(a[:, :, 0] if channels == 1 else a)


def hf_processor(cfg: ImagePreprocessConfig, tmp_path):
    """transformers' PIL-backend CLIP processor, loaded from our to_dict() (tested too)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg.to_dict()))
    return CLIPImageProcessorPil.from_pretrained(tmp_path, local_files_only=True)


def hf_reference(proc, img: Image.Image, cfg: ImagePreprocessConfig) -> np.ndarray:
    """The reference pipeline: Image.convert('RGB'), expand2square, then the HF processor."""
    img = img.convert("RGB")
    if cfg.pad_to_square:
        img = expand_to_square(img, cfg.background_rgb)
    return proc(img, return_tensors="np")["pixel_values"][0]  # (3, S, S)


@pytest.mark.parametrize("n", [336, 28])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_matches_transformers_clip_processor(tmp_path, n, mode, size):
    cfg = ImagePreprocessConfig.for_image_size(n)
    img = noise_image(*size, mode)
    ours = preprocess_image(img, cfg)
    ref = hf_reference(hf_processor(cfg, tmp_path), img, cfg)
    assert ours.shape == ref.shape == (3, n, n) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-6


@pytest.mark.parametrize(
    "cfg",
    [
        ImagePreprocessConfig(pad_to_square=False),  # some eval scripts skip the padding
        ImagePreprocessConfig(image_size=28, shortest_edge=20),  # crop > resize: zero-padded crop
        ImagePreprocessConfig(image_size=24, shortest_edge=30, do_normalize=False),
        ImagePreprocessConfig(image_size=28, shortest_edge=28, do_rescale=False),
    ],
    ids=["no-pad", "crop-bigger", "no-normalize", "no-rescale"],
)
def test_matches_transformers_other_settings(tmp_path, cfg):
    proc = hf_processor(cfg, tmp_path)
    for w, h in [(640, 480), (333, 517), (1, 7)]:
        img = noise_image(w, h, "RGB", seed=w)
        ours, ref = preprocess_image(img, cfg), hf_reference(proc, img, cfg)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref.astype(np.float32)).max() < 1e-6


def test_padding_to_square_is_applied():
    cfg = ImagePreprocessConfig()
    assert cfg.background_rgb == (122, 116, 104)
    img = noise_image(640, 480, "RGB")
    padded = expand_to_square(img, cfg.background_rgb)
    a = np.asarray(padded)  # (640, 640, 3)
    assert padded.size == (640, 640)
    assert (a[:80] == (122, 116, 104)).all() and (a[560:] == (122, 116, 104)).all()
    assert (a[80:560] == np.asarray(img)).all()  # centred
    ours = preprocess_image(img, cfg)
    unpadded = preprocess_image(img, ImagePreprocessConfig(pad_to_square=False))
    assert np.abs(ours - unpadded).max() > 1.0  # skipping the pad would change the input a lot
    # The top band of the output is the pad colour, normalised as transformers does it.
    mean, std = np.float32(CLIP_MEAN), np.float32(CLIP_STD)
    pad = ((np.float64([122, 116, 104]) / 255).astype(np.float32) - mean) / std  # (3,)
    assert np.abs(ours[:, :40, :] - pad[:, None, None]).max() < 1e-6
    tall = np.asarray(expand_to_square(noise_image(3, 8, "RGB"), (1, 2, 3)))  # (8, 8, 3)
    assert (tall[:, :2] == (1, 2, 3)).all() and (tall[:, 5:] == (1, 2, 3)).all()


def test_numpy_input_equals_pil_input():
    cfg = ImagePreprocessConfig.for_image_size(28)
    rgb = np.asarray(noise_image(64, 48, "RGB"))  # (48, 64, 3)
    assert np.array_equal(preprocess_image(rgb, cfg), preprocess_image(Image.fromarray(rgb), cfg))
    bgr = rgb[:, :, ::-1]  # a non-contiguous view, as from a bgr8 message
    assert np.array_equal(preprocess_image(bgr[:, :, ::-1], cfg), preprocess_image(rgb, cfg))
    gray = rgb[:, :, 0]
    expected = preprocess_image(Image.fromarray(gray), cfg)
    assert np.array_equal(preprocess_image(gray, cfg), expected)
    assert np.array_equal(preprocess_image(gray[:, :, None], cfg), expected)
    rgba = np.asarray(noise_image(64, 48, "RGBA"))
    assert np.array_equal(preprocess_image(rgba, cfg), preprocess_image(Image.fromarray(rgba), cfg))


def test_config_from_and_to_dict():
    # openai/clip-vit-large-patch14-336's preprocessor_config.json (old int-valued keys)
    hub = {
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "resample": 3, "size": 336,
    }  # fmt: skip
    assert ImagePreprocessConfig.from_dict(hub) == ImagePreprocessConfig()
    cfg = ImagePreprocessConfig.for_image_size(28, pad_to_square=False)
    assert ImagePreprocessConfig.from_dict(cfg.to_dict(), pad_to_square=False) == cfg
    assert ImagePreprocessConfig.from_dict({"image_mean": 0.5}).image_mean == (0.5, 0.5, 0.5)
    assert ImagePreprocessConfig().to_dict()["image_processor_type"] == "CLIPImageProcessor"


def test_autoimageprocessor_loads_to_dict(tmp_path):
    from transformers import AutoImageProcessor

    config = json.dumps(ImagePreprocessConfig().to_dict())
    (tmp_path / "preprocessor_config.json").write_text(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(proc).__name__.startswith("CLIPImageProcessor")
    assert proc.crop_size["height"] == 336 and proc.size["shortest_edge"] == 336


def test_config_errors():
    with pytest.raises(PreprocessConfigError, match="shortest_edge"):
        ImagePreprocessConfig.from_dict({"size": {"height": 336, "width": 336}})
    with pytest.raises(PreprocessConfigError, match="square"):
        ImagePreprocessConfig.from_dict({"crop_size": {"height": 336, "width": 224}})
    with pytest.raises(PreprocessConfigError, match="resample"):
        ImagePreprocessConfig.from_dict({"resample": 42})
    with pytest.raises(PreprocessConfigError, match="3 values"):
        ImagePreprocessConfig.from_dict({"image_mean": [0.5, 0.5]})
    with pytest.raises(PreprocessConfigError, match="bad preprocessor config value"):
        ImagePreprocessConfig.from_dict({"rescale_factor": "x"})
    with pytest.raises(PreprocessConfigError, match="positive"):
        ImagePreprocessConfig.for_image_size(0)


def test_bad_images_raise():
    with pytest.raises(ImagePreprocessError, match="empty: 0x10"):
        preprocess_image(Image.new("RGB", (0, 10)))
    with pytest.raises(ImagePreprocessError, match="empty"):
        preprocess_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ImagePreprocessError, match=r"got shape \(4, 4, 2\)"):
        preprocess_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImagePreprocessError, match="got shape"):
        preprocess_image(np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ImagePreprocessError, match="must be uint8, got float32"):
        preprocess_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImagePreprocessError, match="PIL image or a numpy array, got list"):
        preprocess_image([[0, 0, 0]])
    with pytest.raises(ImagePreprocessError, match="'La'"):
        preprocess_image(Image.new("La", (4, 4)))


def test_load_image(tmp_path):
    path = tmp_path / "rgba.png"
    noise_image(30, 20, "RGBA").save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert preprocess_image(img).shape == (3, 336, 336)


@pytest.mark.parametrize("content", [b"not an image at all", b""], ids=["garbage", "empty-file"])
def test_load_image_corrupt(tmp_path, content):
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match="broken.jpg") as info:
        load_image(path)
    assert isinstance(info.value, ValueError)


def test_load_image_truncated_and_missing(tmp_path):
    path = tmp_path / "cut.jpg"
    noise_image(64, 64, "RGB").save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg.*truncated"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("shape", [(480, 640), (1080, 1920), (300, 200), (336, 336)])
def test_device_preprocessing_is_within_its_stated_tolerance_of_the_exact_path(shape):
    """The GPU path (here on the CPU, or on LLAVA_PHI_TEST_DEVICE) against the exact CPU path,
    on uniform noise (the worst case for a resampler) and on a rendered scene."""
    import os

    from llava_phi_ros.model.preprocess_device import (
        DEVICE_MEAN_LEVELS,
        DEVICE_TOLERANCE_LEVELS,
        preprocess_on_device,
    )
    from llava_phi_ros.training.scenes import generate_scenes, render_scene

    device = os.environ.get("LLAVA_PHI_TEST_DEVICE", "cpu")
    cfg = ImagePreprocessConfig()
    levels_per_unit = np.asarray(cfg.image_std, dtype=np.float64)[:, None, None] * 255
    h, w = shape
    noise = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    scene = np.asarray(render_scene(generate_scenes(1, seed=h)[0]).resize((w, h)))
    for frame in (noise, scene):
        exact = preprocess_image(frame, cfg)
        on_device = preprocess_on_device(frame, cfg, device)
        assert on_device.shape == exact.shape and str(on_device.device).startswith(device)
        levels = np.abs(on_device.cpu().numpy() - exact) * levels_per_unit
        assert levels.max() <= DEVICE_TOLERANCE_LEVELS + 1e-3
        assert levels.mean() <= DEVICE_MEAN_LEVELS


def test_device_preprocessing_zero_pads_a_crop_larger_than_the_resized_image():
    """shortest_edge below the crop size (no square padding): both paths zero-pad the crop the
    same way (center_crop_layout), within the stated tolerance."""
    from llava_phi_ros.model.preprocess_device import DEVICE_TOLERANCE_LEVELS, preprocess_on_device

    cfg = ImagePreprocessConfig(shortest_edge=320, pad_to_square=False)
    frame = np.random.default_rng(1).integers(0, 256, (240, 300, 3), dtype=np.uint8)
    exact = preprocess_image(frame, cfg)
    levels = np.abs(preprocess_on_device(frame, cfg, "cpu").numpy() - exact) * \
        np.asarray(cfg.image_std)[:, None, None] * 255
    assert levels.max() <= DEVICE_TOLERANCE_LEVELS + 1e-3
    padded_value = (0 - np.asarray(cfg.image_mean)) / np.asarray(cfg.image_std)  # a zero pixel
    np.testing.assert_allclose(exact[:, :8, 0], np.broadcast_to(padded_value[:, None], (3, 8)),
                               rtol=1e-6)

"""Debug-image overlay: a copy with bands and text, any image size, any text."""

import numpy as np
import pytest
from PIL import ImageFont

from llava_phi_ros.ros import debug_overlay
from llava_phi_ros.ros.debug_overlay import draw_answer, font_for_height, wrap_text


def _frame(h: int, w: int, value: int = 200) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_copy_with_same_shape_and_input_untouched():
    rgb = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    before = rgb.copy()
    out = draw_answer(rgb, "Is the door open?", "Yes, the door is open.", "front", 12.5, 83.0)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert not np.shares_memory(out, rgb)
    np.testing.assert_array_equal(rgb, before)


def test_bands_change_pixels_top_and_bottom_and_leave_the_middle():
    rgb = _frame(480, 640)
    out = draw_answer(rgb, "What colour is the cup?", "red", "camera", 1.0, 10.0)
    changed_rows = np.nonzero((out != rgb).any(axis=(1, 2)))[0]
    assert changed_rows.min() == 0 and changed_rows.max() == 479
    assert (out[0] < rgb[0]).all()  # the band darkens the first row
    assert (out[-1] < rgb[-1]).all()
    np.testing.assert_array_equal(out[240], rgb[240])  # the middle of the frame is visible
    # Text is drawn inside the band: brighter than the darkened background somewhere.
    top = out[:40]
    assert top.max() > top[0, 0].max()


def test_meta_line_text_is_drawn(monkeypatch):
    drawn: list[str] = []
    real_wrap = debug_overlay.wrap_text

    def spy(text, font, max_width, max_lines):
        lines = real_wrap(text, font, max_width, max_lines)
        drawn.extend(lines)
        return lines

    monkeypatch.setattr(debug_overlay, "wrap_text", spy)
    draw_answer(_frame(720, 1280), "Which bin?", "The left bin.", "wrist_cam", 1712.345678, 91.6)
    text = " | ".join(drawn)
    assert "Q: Which bin?" in text and "A: The left bin." in text
    assert "wrist_cam" in text and "t=1712.346s" in text and "92 ms" in text


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (28, 28), (10, 400), (400, 10), (64, 48)])
def test_tiny_and_odd_images_do_not_crash(shape):
    rgb = _frame(*shape)
    out = draw_answer(rgb, "question " * 20, "answer " * 200, "c", 0.0, 0.0)
    assert out.shape == rgb.shape and out.dtype == np.uint8


def test_huge_image():
    rgb = _frame(2160, 3840, 90)
    out = draw_answer(rgb, "Q?", "A long answer " * 100, "cam", 3.0, 1234.0)
    assert out.shape == rgb.shape
    assert (out[0] < rgb[0]).all() and (out[-1] < rgb[-1]).all()


@pytest.mark.parametrize("text", [
    "Ist die Tür offen? Ça va — naïve façade",
    "机器人看到了什么？红色的杯子。",
    "emoji \U0001f916 and a tab\tand\nnewlines\r\n and \x00 control",
    "",
])
def test_unicode_and_control_characters(text):
    out = draw_answer(_frame(240, 320), text, text, text or "cam", 0.0, 0.0)
    assert out.shape == (240, 320, 3)


def test_wrap_text_respects_width_and_truncates_with_an_ellipsis():
    font = font_for_height(480, 640)
    long = "word " * 200
    lines = wrap_text(long.strip(), font, 200, 3)
    assert len(lines) == 3
    assert all(font.getlength(line) <= 200 for line in lines)
    # Pillow < 10.1 (no sized load_default) gives the Latin-1 bitmap font, which gets "...".
    ellipsis = "\u2026" if isinstance(font, ImageFont.FreeTypeFont) else "..."
    assert lines[-1].endswith(ellipsis)
    assert wrap_text("short", font, 200, 3) == ["short"]
    assert wrap_text("", font, 200, 3) == []
    assert wrap_text("anything", font, 200, 0) == []


def test_wrap_text_breaks_words_longer_than_the_line():
    font = font_for_height(480, 640)
    lines = wrap_text("x" * 500, font, 100, 50)
    assert len(lines) > 1 and "".join(lines) == "x" * 500
    assert all(font.getlength(line) <= 100 for line in lines)
    # Narrower than one character: still progresses, one character per line.
    assert wrap_text("abc", font, 1, 10) == ["a", "b", "c"]


def test_font_scales_with_image_size():
    small, large = font_for_height(240, 320), font_for_height(1080, 1920)
    if isinstance(large, ImageFont.FreeTypeFont):
        assert large.size > small.size
        assert font_for_height(28, 28).size >= 8


def test_bitmap_font_fallback_handles_unicode(monkeypatch):
    # Pillow < 10.1 (JetPack 6 ships 9.0) has no size argument and returns its Latin-1 bitmap
    # font: emulate that load_default().
    if not hasattr(ImageFont, "load_default_imagefont"):
        bitmap = ImageFont.load_default()  # pragma: no cover - an old Pillow already
    else:
        bitmap = ImageFont.load_default_imagefont()

    def old_load_default(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return bitmap

    monkeypatch.setattr(ImageFont, "load_default", old_load_default)
    debug_overlay._load_font.cache_clear()
    try:
        font = font_for_height(480, 640)
        assert font is bitmap
        out = draw_answer(_frame(480, 640), "机器人 Tür?", "红色 " * 50, "cam", 0.0, 1.0)
        assert out.shape == (480, 640, 3)
        assert (out[-1] < 200).all()
        lines = wrap_text("word " * 100, font, 150, 2)
        assert len(lines) == 2 and lines[-1].endswith("...")
    finally:
        debug_overlay._load_font.cache_clear()


def test_rejects_non_rgb_input():
    for bad in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ValueError, match="RGB"):
            draw_answer(bad, "q", "a", "c", 0.0, 0.0)

"""Debug image for rviz: the answered frame with its question, answer and provenance drawn on it.

Pure numpy + Pillow (no ROS imports), so it is tested on plain arrays. A semi-transparent band
at the top holds the question and a line with camera, image stamp and latency; one at the bottom
holds the wrapped answer (truncated with an ellipsis when it does not fit). Text scales with the
image; tiny images get whatever fits.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["draw_answer", "font_for_height", "wrap_text"]

_BAND_ALPHA = 160  # of 256: how much the band darkens the frame
_QUESTION_COLOUR = (255, 255, 255)
_META_COLOUR = (190, 190, 190)
_ANSWER_COLOUR = (140, 255, 140)
_MIN_FONT_PX = 8
_MAX_FONT_PX = 96


@functools.lru_cache(maxsize=16)
def _load_font(size: int) -> Any:
    """Pillow's default font at ``size`` px (Pillow >= 10.1 with FreeType), else its bitmap."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        # Pillow < 10.1 (JetPack 6 ships 9.0) has no size argument; no FreeType: bitmap only.
        return ImageFont.load_default()


def font_for_height(height: int, width: int) -> Any:
    """The font for an image of this size: about 1/28 of the height, at least 8 px."""
    size = max(_MIN_FONT_PX, min(_MAX_FONT_PX, round(height / 28), round(width / 24)))
    return _load_font(size)


def _is_bitmap(font: Any) -> bool:
    """True for Pillow's legacy bitmap font, which can only draw Latin-1."""
    return not isinstance(font, ImageFont.FreeTypeFont)


def _clean(text: str, font: Any) -> str:
    """One line of printable text: whitespace collapsed, control characters dropped."""
    text = "".join(" " if ch.isspace() else ch for ch in str(text)
                   if ch.isspace() or unicodedata.category(ch)[0] != "C")
    text = re.sub(r" {2,}", " ", text).strip()
    if _is_bitmap(font):
        text = text.encode("latin-1", "replace").decode("latin-1")
    return text


def _text_width(font: Any, text: str) -> float:
    """Rendered width of ``text`` in pixels (getlength on Pillow >= 9.2, getsize before)."""
    if hasattr(font, "getlength"):
        return float(font.getlength(text))
    return float(font.getsize(text)[0])  # pragma: no cover - Pillow < 9.2


def _line_height(font: Any) -> int:
    """Height of one text line in pixels, with a little leading."""
    if hasattr(font, "getbbox"):
        top, bottom = font.getbbox("Agy|")[1::2]
        height = bottom - min(top, 0)
    else:  # pragma: no cover - Pillow < 9.2
        height = font.getsize("Agy|")[1]
    return max(1, int(round(height * 1.2)))


def wrap_text(text: str, font: Any, max_width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to ``max_width`` px; at most ``max_lines``, the last one ellipsised."""
    if max_lines <= 0:
        return []
    ellipsis = "..." if _is_bitmap(font) else "\u2026"
    lines: list[str] = []
    current = ""
    words = text.split(" ") if text else []
    i = 0
    while i < len(words) and len(lines) <= max_lines:  # stop once truncation is certain
        word = words[i]
        candidate = f"{current} {word}" if current else word
        if _text_width(font, candidate) <= max_width:
            current = candidate
            i += 1
            continue
        if current:  # the word goes on the next line
            lines.append(current)
            current = ""
            continue
        # A single word wider than the line: break it between characters.
        cut = max(1, _fit_prefix(font, word, max_width))
        lines.append(word[:cut])
        words[i] = word[cut:]
    if current and len(lines) <= max_lines:
        lines.append(current)
    if len(lines) > max_lines or i < len(words):
        last = lines[max_lines - 1]
        while last and _text_width(font, last + ellipsis) > max_width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + ellipsis]
    return lines


def _fit_prefix(font: Any, word: str, max_width: float) -> int:
    """Length of the longest prefix of ``word`` that fits ``max_width`` (binary search)."""
    lo, hi = 0, len(word)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _text_width(font, word[:mid]) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _darken(out: np.ndarray, y0: int, y1: int) -> None:
    """Blend rows [y0, y1) of ``out`` towards black in place (the translucent band)."""
    if y1 <= y0:
        return
    band = out[y0:y1].astype(np.uint16)
    band *= 256 - _BAND_ALPHA
    out[y0:y1] = (band >> 8).astype(np.uint8)


def draw_answer(
    rgb: np.ndarray,
    question: str,
    answer: str,
    camera: str,
    stamp_s: float,
    latency_ms: float,
) -> np.ndarray:
    """Return a copy of an (H, W, 3) uint8 frame with question, answer and provenance drawn."""
    frame = np.asarray(rgb)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 or 0 in frame.shape:
        raise ValueError(
            f"draw_answer needs an (H, W, 3) uint8 RGB image, got {frame.shape} {frame.dtype}"
        )
    height, width = frame.shape[:2]
    font = font_for_height(height, width)
    line_h = _line_height(font)
    pad = max(1, line_h // 4)
    text_w = max(1, width - 2 * pad)

    # Top: the question (up to 2 lines) and one line of provenance. Bottom: the answer, up to
    # 6 lines or 40% of the image. Tiny images keep what fits; nothing ever fails on size.
    max_rows = max(1, (height - 2 * pad) // line_h)
    question_lines = wrap_text("Q: " + _clean(question, font), font, text_w,
                               min(2, max(1, max_rows // 3)))
    meta = _clean(f"{camera} | t={stamp_s:.3f}s | {latency_ms:.0f} ms", font)
    meta_lines = wrap_text(meta, font, text_w, 1)
    answer_rows = max(1, min(6, int(height * 0.4) // line_h))
    answer_lines = wrap_text("A: " + _clean(answer, font), font, text_w, answer_rows)

    top_lines = [(line, _QUESTION_COLOUR) for line in question_lines]
    top_lines += [(line, _META_COLOUR) for line in meta_lines]
    top_h = min(height, len(top_lines) * line_h + 2 * pad)
    bottom_h = min(max(0, height - top_h), len(answer_lines) * line_h + 2 * pad)

    out = np.array(frame, dtype=np.uint8, order="C")  # the caller's frame stays untouched
    _darken(out, 0, top_h)
    _darken(out, height - bottom_h, height)

    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    y = pad
    for line, colour in top_lines:
        draw.text((pad, y), line, font=font, fill=colour)
        y += line_h
    y = height - bottom_h + pad
    for line in answer_lines:
        draw.text((pad, y), line, font=font, fill=_ANSWER_COLOUR)
        y += line_h
    return np.array(image, dtype=np.uint8)

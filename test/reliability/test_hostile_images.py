"""Hostile image messages: thousands of generated Image and CompressedImage messages (any
encoding string, size, step, endianness and byte length; garbage, truncated and bomb-sized
compressed data) convert to exactly the (H, W, 3) image their fields describe or raise
ImageConversionError with a specific message: never another exception, never an allocation
beyond what the message itself justifies."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from llava_phi_ros.ros.image_conversion import (
    SUPPORTED_ENCODINGS,
    ImageConversionError,
    compressed_msg_to_rgb,
    image_msg_to_rgb,
    rgb_to_encoding,
)

ALIASES = ["8UC1", "16UC1", "8UC3", "8UC4", "yuyv", "YUY2", "uyvy", "RGB8", " bgr8 "]
GARBAGE = ["", "rgb16", "32FC1", "bayer_rggb8", "jpeg", "\x00", "rgb8\n", "ü", "a" * 300]
SIZES = st.one_of(st.integers(0, 40), st.sampled_from([2**16, 2**31 - 1, 2**31, 2**32 + 1]))
LIMIT = 64 * 2**20  # no conversion of a message under 1 MB may allocate more than this


def converted(result, success_event: str) -> bool:
    """Whether a conversion gave an image; a refusal must be a specific ImageConversionError."""
    refused = isinstance(result, Exception)
    event("refused" if refused else success_event)
    if refused:
        assert isinstance(result, ImageConversionError), repr(result)
        assert str(result)  # a specific message, never empty
    return not refused


def peak_bytes(fn, *args):
    """fn(*args)'s result (or exception) and the peak of memory it allocated."""
    tracemalloc.start()
    try:
        try:
            result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - returned for the test to judge
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


BYTES_PER_PIXEL = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 2,
                   "yuv422_yuy2": 2, "yuv422": 2}


@st.composite
def raw_messages(draw):
    """Half consistent (a real encoding, step >= width * bytes per pixel, the data that step
    needs, give or take a byte), half anything at all."""
    seed = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        encoding = draw(st.sampled_from(sorted(BYTES_PER_PIXEL)))
        height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        step = width * BYTES_PER_PIXEL[encoding] + draw(st.integers(0, 9))
        length = height * step + draw(st.sampled_from([0, 0, 0, -1, 1]))
    else:
        encoding = draw(st.sampled_from([*SUPPORTED_ENCODINGS, *ALIASES, *GARBAGE]))
        height, width = draw(SIZES), draw(SIZES)
        step = draw(st.one_of(st.integers(0, 200), SIZES))
        length = draw(st.one_of(st.just(min(height * step, 2**16)), st.integers(0, 2**16)))
    data = np.random.default_rng(seed).bytes(max(length, 0))
    return SimpleNamespace(encoding=encoding, height=height, width=width, step=step,
                           is_bigendian=draw(st.integers(0, 255)), data=data)


@settings(max_examples=3000)
@given(raw_messages())
def test_raw_images_convert_or_refuse_specifically(msg):
    result, peak = peak_bytes(image_msg_to_rgb, msg)
    if converted(result, "converted"):
        assert result.shape == (msg.height, msg.width, 3) and result.dtype == np.uint8
        assert result.flags.c_contiguous
    assert peak < LIMIT, (peak, msg.encoding, msg.height, msg.width, msg.step, len(msg.data))


@settings(max_examples=500)
@given(st.integers(1, 24), st.integers(1, 24),
       st.sampled_from(["rgb8", "bgr8", "rgba8", "bgra8", "mono8"]), st.integers(0, 7),
       st.randoms(use_true_random=False))
def test_lossless_encodings_round_trip_with_any_row_padding(h, w, encoding, pad, rnd):
    rgb = np.frombuffer(rnd.randbytes(h * w * 3), np.uint8).reshape(h, w, 3)
    if encoding == "mono8":
        rgb = np.repeat(rgb[:, :, :1], 3, axis=2)
    data, step = rgb_to_encoding(rgb, encoding)
    rows = np.frombuffer(data, np.uint8).reshape(h, step)
    padded = np.concatenate([rows, np.full((h, pad), 0xAB, np.uint8)], axis=1)
    msg = SimpleNamespace(encoding=encoding, height=h, width=w, step=step + pad,
                          is_bigendian=0, data=padded.tobytes())
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)


def _png(width: int, height: int, body: bytes, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG with this IHDR and one IDAT of `body` (compressed as given)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
            ">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


def _jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    PILImage.fromarray(rgb).save(out, format="JPEG", quality=80)
    return out.getvalue()


VALID_JPEG = _jpeg(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
VALID_PNG = _png(4, 3, zlib.compress(b"".join(b"\x00" + bytes(12) for _ in range(3))))


@st.composite
def compressed_messages(draw):
    fmt = draw(st.sampled_from(["jpeg", "png", "", "rgb8; jpeg compressed bgr8", "PNG",
                                "compressedDepth png", "tiff", "bmp", "jpg", "\x00"]))
    source = draw(st.sampled_from(["garbage", "truncated_jpeg", "truncated_png", "flipped",
                                   "empty"]))
    if source == "garbage":
        data = draw(st.binary(max_size=4096))
    elif source == "truncated_jpeg":
        data = VALID_JPEG[:draw(st.integers(0, len(VALID_JPEG) - 1))]
    elif source == "truncated_png":
        data = VALID_PNG[:draw(st.integers(0, len(VALID_PNG) - 1))]
    elif source == "flipped":
        base = draw(st.sampled_from([VALID_JPEG, VALID_PNG]))
        i = draw(st.integers(0, len(base) - 1))
        data = base[:i] + bytes([base[i] ^ draw(st.integers(1, 255))]) + base[i + 1:]
    else:
        data = b""
    return SimpleNamespace(format=fmt, data=data)


@settings(max_examples=2000)
@given(compressed_messages())
def test_compressed_garbage_decodes_or_refuses_specifically(msg):
    result, peak = peak_bytes(compressed_msg_to_rgb, msg)
    if converted(result, "decoded"):
        assert result.ndim == 3 and result.shape[2] == 3 and result.dtype == np.uint8
    assert peak < LIMIT, (peak, msg.format, len(msg.data))


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (2**31 - 1, 1), (60_000, 60_000)])
def test_decompression_bombs_are_refused_without_decoding(width, height):
    """A few hundred bytes that claim gigapixels: refused from the header, never decoded."""
    bomb = _png(width, height, zlib.compress(b"\x00" * 1000, 9))
    result, peak = peak_bytes(compressed_msg_to_rgb, SimpleNamespace(format="png", data=bomb))
    assert isinstance(result, ImageConversionError), repr(result)
    assert peak < LIMIT

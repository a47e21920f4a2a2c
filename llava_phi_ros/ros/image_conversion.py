"""sensor_msgs/Image and CompressedImage <-> RGB numpy arrays, without cv_bridge.

The converters read only the message's fields (``height``, ``width``, ``encoding``, ``step``,
``is_bigendian``, ``data``; ``format`` and ``data`` for compressed images), so any object with
those attributes works: a message as it arrives from a subscription (``data`` is an
``array.array('B')``), one built in a test (``bytes``), or a plain namespace. Pixel data is read
through ``np.frombuffer`` and strided views; the only copy is the final one into a contiguous
array the caller owns (rclpy may reuse a message's buffer).

Colour conventions follow cv_bridge / OpenCV, so results match what a ROS C++ pipeline sees:
``mono16`` is reduced to 8 bit by taking the high byte (``>> 8``), and ``yuv422_yuy2`` (YUYV)
and ``yuv422`` (UYVY) are decoded as BT.601 limited ("video") range, like
``cv::COLOR_YUV2RGB_YUYV``.
"""

from __future__ import annotations

import array
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

__all__ = [
    "COMPRESSED_FORMATS",
    "SUPPORTED_ENCODINGS",
    "ImageConversionError",
    "check_compressed_msg",
    "check_image_msg",
    "compressed_msg_to_rgb",
    "image_msg_to_rgb",
    "rgb_to_compressed_msg",
    "rgb_to_encoding",
    "rgb_to_image_msg",
]


class ImageConversionError(ValueError):
    """An image message that cannot be converted: bad encoding, size, layout or data."""


# Canonical encodings, their bytes per pixel. Aliases map onto these.
_BYTES_PER_PIXEL: dict[str, int] = {
    "rgb8": 3,
    "bgr8": 3,
    "rgba8": 4,
    "bgra8": 4,
    "mono8": 1,
    "mono16": 2,
    "yuv422_yuy2": 2,
    "yuv422": 2,
}
# OpenCV-typed encodings (cv_bridge's "passthrough" output) and other common spellings.
# 8UC3 / 8UC4 are treated as OpenCV's BGR / BGRA layout, which is what an OpenCV Mat holds.
_ALIASES: dict[str, str] = {
    "8uc1": "mono8",
    "16uc1": "mono16",
    "8uc3": "bgr8",
    "8uc4": "bgra8",
    "yuyv": "yuv422_yuy2",
    "yuy2": "yuv422_yuy2",
    "uyvy": "yuv422",
}
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_BYTES_PER_PIXEL)
COMPRESSED_FORMATS: tuple[str, ...] = ("jpeg", "png")

# BT.601 limited range (Y in [16, 235], Cb/Cr in [16, 240]) YCbCr -> RGB coefficients,
# in 16.16 fixed point: R = Ys + 1.596 V, G = Ys - 0.392 U - 0.813 V, B = Ys + 2.017 U with
# Ys = 1.164 (Y - 16), U = Cb - 128, V = Cr - 128.
_FIX = 16
_Y_GAIN = round(255 / 219 * (1 << _FIX))
_RV = round(255 / 224 * 1.402 * (1 << _FIX))
_GU = round(255 / 224 * 1.772 * 0.114 / 0.587 * (1 << _FIX))
_GV = round(255 / 224 * 1.402 * 0.299 / 0.587 * (1 << _FIX))
_BU = round(255 / 224 * 1.772 * (1 << _FIX))


def canonical_encoding(encoding: str) -> str:
    """Return the canonical name of a supported encoding, or raise ImageConversionError."""
    name = encoding.strip()
    if name in _BYTES_PER_PIXEL:
        return name
    lowered = name.lower()
    if lowered in _BYTES_PER_PIXEL:
        return lowered
    if lowered in _ALIASES:
        return _ALIASES[lowered]
    raise ImageConversionError(
        f"unsupported image encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)} "
        f"(aliases: {', '.join(sorted(_ALIASES))})"
    )


def _as_uint8_buffer(data: Any) -> np.ndarray:
    """View message data (bytes, bytearray, memoryview, array.array, ndarray) as flat uint8."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        pass
    # A plain list/tuple of ints (rare: hand-built messages). Converted in C, not per byte in
    # Python; values outside 0..255 are a data error.
    try:
        arr = np.asarray(data, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ImageConversionError(f"image data is not a byte buffer: {exc}") from exc
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ImageConversionError("image data values must be bytes (0..255)")
    return arr.astype(np.uint8)


def _rows(msg: Any, bytes_per_pixel: int, encoding: str) -> tuple[np.ndarray, int, int]:
    """Check the geometry and return the (H, width*bpp) byte view without row padding."""
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"image has zero size: {width}x{height} ({encoding})")
    row_bytes = width * bytes_per_pixel
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is smaller than width*bytes_per_pixel = {width}*{bytes_per_pixel} = "
            f"{row_bytes} for {encoding}"
        )
    buf = _as_uint8_buffer(msg.data)
    if buf.size != step * height:
        raise ImageConversionError(
            f"data length {buf.size} != step*height = {step}*{height} = {step * height} "
            f"({width}x{height} {encoding})"
        )
    # (H, step) -> crop the padding: a strided view, no copy yet.
    return buf.reshape(height, step)[:, :row_bytes], height, width


def _gather_channels(pixels: np.ndarray, channels: tuple[int, int, int]) -> np.ndarray:
    """Copy channels (e.g. (2, 1, 0) for BGR) of an (H, W, C) view into a new (H, W, 3) array."""
    # One strided copy per channel: several times faster in numpy than copying a reversed or
    # sliced channel view in one go (np.ascontiguousarray(v[:, :, ::-1])).
    out = np.empty((pixels.shape[0], pixels.shape[1], 3), dtype=np.uint8)
    for dst, src in enumerate(channels):
        out[:, :, dst] = pixels[:, :, src]
    return out


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """Replicate an (H, W) uint8 view into a new contiguous (H, W, 3) array."""
    out = np.empty((*gray.shape, 3), dtype=np.uint8)
    for dst in range(3):  # per channel: faster than broadcasting gray[:, :, None]
        out[:, :, dst] = gray
    return out


def _yuv_to_rgb(y0: np.ndarray, y1: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Decode macro-pixels (two Y samples sharing U, V; each (H, W/2)) into (H, W, 3) RGB."""
    h, half = y0.shape
    uu = u.astype(np.int32) - 128
    vv = v.astype(np.int32) - 128
    r_off = _RV * vv + (1 << (_FIX - 1))  # + 0.5 for rounding
    g_off = (1 << (_FIX - 1)) - _GU * uu - _GV * vv
    b_off = _BU * uu + (1 << (_FIX - 1))
    out = np.empty((h, half, 2, 3), dtype=np.uint8)  # (H, W/2, 2 pixels, RGB)
    tmp = np.empty((h, half), dtype=np.int32)
    for k, ys in enumerate((y0, y1)):
        yy = (ys.astype(np.int32) - 16) * _Y_GAIN
        for c, off in enumerate((r_off, g_off, b_off)):
            np.add(yy, off, out=tmp)
            np.right_shift(tmp, _FIX, out=tmp)
            np.clip(tmp, 0, 255, out=tmp)
            out[:, :, k, c] = tmp
    return out.reshape(h, half * 2, 3)


def check_image_msg(msg: Any) -> tuple[int, int]:
    """(height, width) of a sensor_msgs/Image that image_msg_to_rgb will convert, checked from
    its fields alone (encoding, size, step against width and length): microseconds, no copy.
    Raises ImageConversionError with the reason otherwise."""
    encoding = canonical_encoding(str(msg.encoding))
    if encoding in ("yuv422_yuy2", "yuv422") and int(msg.width) % 2:
        raise ImageConversionError(
            f"{encoding} needs an even width (two pixels share U and V); got width {msg.width}"
        )
    _, height, width = _rows(msg, _BYTES_PER_PIXEL[encoding], encoding)
    return height, width


def image_msg_to_rgb(msg: Any) -> np.ndarray:
    """Convert a sensor_msgs/Image (or any object with its fields) to a new (H, W, 3) uint8 RGB.

    Supported: rgb8, bgr8, rgba8, bgra8 (alpha dropped), mono8, mono16 (high byte: ``v >> 8``,
    honouring ``is_bigendian``), yuv422_yuy2 / yuyv and yuv422 / uyvy (BT.601 limited range);
    aliases 8UC1, 16UC1, 8UC3 (= bgr8) and 8UC4 (= bgra8). Row padding beyond
    ``width * bytes_per_pixel`` is cropped. Raises ImageConversionError for anything else.
    """
    check_image_msg(msg)
    encoding = canonical_encoding(str(msg.encoding))
    rows, height, width = _rows(msg, _BYTES_PER_PIXEL[encoding], encoding)
    if encoding == "rgb8":
        return np.array(rows.reshape(height, width, 3), order="C")
    if encoding == "bgr8":
        return _gather_channels(rows.reshape(height, width, 3), (2, 1, 0))
    if encoding == "rgba8":
        return _gather_channels(rows.reshape(height, width, 4), (0, 1, 2))
    if encoding == "bgra8":
        return _gather_channels(rows.reshape(height, width, 4), (2, 1, 0))
    if encoding == "mono8":
        return _gray_to_rgb(rows)
    if encoding == "mono16":
        # The high byte of each sample is v >> 8: byte 0 in big-endian data, byte 1 otherwise.
        high = 0 if int(msg.is_bigendian) else 1
        return _gray_to_rgb(rows[:, high::2])
    macro = rows.reshape(height, width // 2, 4)
    if encoding == "yuv422_yuy2":  # Y0 U Y1 V
        return _yuv_to_rgb(macro[:, :, 0], macro[:, :, 2], macro[:, :, 1], macro[:, :, 3])
    # yuv422 (UYVY): U Y0 V Y1
    return _yuv_to_rgb(macro[:, :, 1], macro[:, :, 3], macro[:, :, 0], macro[:, :, 2])


def compressed_format(fmt: str, data: Any = b"") -> str:
    """Return "jpeg" or "png" for a CompressedImage ``format`` string, else raise.

    Accepts image_transport's strings ("rgb8; jpeg compressed bgr8", "png") and plain names; an
    empty format is resolved from the data's magic bytes.
    """
    lowered = fmt.strip().lower()
    if "compresseddepth" in lowered:
        raise ImageConversionError(
            f"unsupported compressed format {fmt!r}: compressedDepth is for depth images; "
            f"supported: {', '.join(COMPRESSED_FORMATS)}"
        )
    if "jpeg" in lowered or "jpg" in lowered:
        return "jpeg"
    if "png" in lowered:
        return "png"
    if not lowered:
        head = bytes(_as_uint8_buffer(data)[:8])
        if head.startswith(b"\xff\xd8"):
            return "jpeg"
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return "png"
        raise ImageConversionError(
            "compressed image has an empty format and its data is neither JPEG nor PNG"
        )
    raise ImageConversionError(
        f"unsupported compressed format {fmt!r}; supported: {', '.join(COMPRESSED_FORMATS)}"
    )


def check_compressed_msg(msg: Any) -> tuple[int, int]:
    """(height, width) of a sensor_msgs/CompressedImage, from its format and the JPEG/PNG
    header alone (no pixel decoded: ~0.1 ms whatever the image size). Raises
    ImageConversionError for an unknown format, no data, or a header that does not parse; the
    pixels are checked only when compressed_msg_to_rgb decodes them."""
    kind = compressed_format(str(msg.format), msg.data)
    buf = _as_uint8_buffer(msg.data)
    if buf.size == 0:
        raise ImageConversionError(f"compressed image ({kind}) has no data")
    try:
        with PILImage.open(io.BytesIO(memoryview(buf)),
                           formats=["JPEG" if kind == "jpeg" else "PNG"]) as img:
            width, height = img.size
    except UnidentifiedImageError as exc:
        raise ImageConversionError(f"corrupt {kind} data: not a valid {kind} image") from exc
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as exc:
        raise ImageConversionError(f"corrupt {kind} data: {exc}") from exc
    if width <= 0 or height <= 0:
        raise ImageConversionError(f"{kind} header gives an empty image ({width}x{height})")
    return height, width


def compressed_msg_to_rgb(msg: Any) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (JPEG or PNG) to a new (H, W, 3) uint8 RGB array.

    16-bit PNGs (image_transport's mono16) are reduced with ``>> 8`` like raw mono16.
    """
    kind = compressed_format(str(msg.format), msg.data)
    buf = _as_uint8_buffer(msg.data)
    if buf.size == 0:
        raise ImageConversionError(f"compressed image ({kind}) has no data")
    pil_format = "JPEG" if kind == "jpeg" else "PNG"
    try:
        with PILImage.open(io.BytesIO(buf.tobytes()), formats=[pil_format]) as img:
            img.load()  # decode now: truncated or corrupt data raises here
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                gray = np.asarray(img).astype(np.uint32) >> 8
                return _gray_to_rgb(np.clip(gray, 0, 255).astype(np.uint8))
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            out = np.array(rgb, dtype=np.uint8)
    except UnidentifiedImageError as exc:
        raise ImageConversionError(f"corrupt {kind} data: not a valid {kind} image") from exc
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as exc:
        raise ImageConversionError(f"corrupt {kind} data: {exc}") from exc
    if out.ndim != 3 or out.shape[2] != 3 or 0 in out.shape:
        raise ImageConversionError(f"decoded {kind} has an unusable shape {out.shape}")
    return out


def _check_rgb(array_: np.ndarray) -> np.ndarray:
    """Validate an (H, W, 3) uint8 array and return it C-contiguous."""
    arr = np.asarray(array_)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageConversionError(f"expected an (H, W, 3) RGB array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ImageConversionError(f"expected a uint8 RGB array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma (Pillow's "L" conversion), (H, W) uint8."""
    r, g, b = (rgb[:, :, c].astype(np.uint32) for c in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _rgb_to_yuyv(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range RGB -> YUYV bytes, (H, W*2) uint8; U/V from the pixel pair's mean."""
    h, w, _ = rgb.shape
    f = rgb.astype(np.float32)
    r, g, b = f[:, :, 0], f[:, :, 1], f[:, :, 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    rp = (r[:, 0::2] + r[:, 1::2]) * 0.5
    gp = (g[:, 0::2] + g[:, 1::2]) * 0.5
    bp = (b[:, 0::2] + b[:, 1::2]) * 0.5
    u = 128.0 + (-37.797 * rp - 74.203 * gp + 112.0 * bp) / 255.0
    v = 128.0 + (112.0 * rp - 93.786 * gp - 18.214 * bp) / 255.0
    out = np.empty((h, w // 2, 4), dtype=np.uint8)
    out[:, :, 0] = np.clip(np.rint(y[:, 0::2]), 0, 255)
    out[:, :, 1] = np.clip(np.rint(u), 0, 255)
    out[:, :, 2] = np.clip(np.rint(y[:, 1::2]), 0, 255)
    out[:, :, 3] = np.clip(np.rint(v), 0, 255)
    return out.reshape(h, w * 2)


_ENCODERS: dict[str, Callable[[np.ndarray, bool], np.ndarray]] = {
    "rgb8": lambda a, _be: a.reshape(a.shape[0], -1),
    "bgr8": lambda a, _be: a[:, :, ::-1].reshape(a.shape[0], -1),
    "rgba8": lambda a, _be: np.concatenate(
        [a, np.full((*a.shape[:2], 1), 255, np.uint8)], axis=2).reshape(a.shape[0], -1),
    "bgra8": lambda a, _be: np.concatenate(
        [a[:, :, ::-1], np.full((*a.shape[:2], 1), 255, np.uint8)], axis=2
    ).reshape(a.shape[0], -1),
    "mono8": lambda a, _be: _luma(a),
    # 8-bit luma v -> v * 257, so that v16 >> 8 == v again.
    "mono16": lambda a, be: (_luma(a).astype(np.uint16) * 257).astype(">u2" if be else "<u2")
    .view(np.uint8).reshape(a.shape[0], -1),
    "yuv422_yuy2": lambda a, _be: _rgb_to_yuyv(a),
    "yuv422": lambda a, _be: _rgb_to_yuyv(a).reshape(a.shape[0], -1, 4)[:, :, [1, 0, 3, 2]]
    .reshape(a.shape[0], -1),
}


def rgb_to_encoding(
    array_: np.ndarray, encoding: str, *, row_padding: int = 0, big_endian: bool = False
) -> tuple[bytes, int]:
    """Encode an (H, W, 3) uint8 RGB array as ``encoding``; return (data, step).

    The inverse of image_msg_to_rgb, for tests and the demo publisher: mono encodings get BT.601
    luma (mono16 = luma * 257), yuv422 encodings a BT.601 limited-range RGB -> YUV conversion
    (even width only), rgba8/bgra8 an opaque alpha. ``row_padding`` extra zero bytes per row
    exercise ``step`` handling; ``big_endian`` applies to mono16.
    """
    rgb = _check_rgb(array_)
    name = canonical_encoding(encoding)
    if row_padding < 0:
        raise ImageConversionError(f"row_padding must be >= 0, got {row_padding}")
    if name in ("yuv422_yuy2", "yuv422") and rgb.shape[1] % 2:
        raise ImageConversionError(f"{name} needs an even width; got width {rgb.shape[1]}")
    rows = _ENCODERS[name](rgb, big_endian)
    if row_padding:
        padded = np.zeros((rows.shape[0], rows.shape[1] + row_padding), dtype=np.uint8)
        padded[:, : rows.shape[1]] = rows
        rows = padded
    return np.ascontiguousarray(rows).tobytes(), rows.shape[1]


def rgb_to_image_msg(array_: np.ndarray, header: Any = None) -> Any:
    """Build a sensor_msgs/Image (rgb8, step = 3*W) from an (H, W, 3) uint8 RGB array."""
    from sensor_msgs.msg import Image

    rgb = _check_rgb(array_)
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = 3 * msg.width
    # array.array('B', bytes) is a memcpy; assigning bytes would be checked byte by byte.
    msg.data = array.array("B", rgb.tobytes())
    return msg


def encode_compressed(array_: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """Encode an (H, W, 3) uint8 RGB array as JPEG or PNG bytes with Pillow."""
    rgb = _check_rgb(array_)
    kind = compressed_format(fmt)
    out = io.BytesIO()
    if kind == "jpeg":
        PILImage.fromarray(rgb).save(out, format="JPEG", quality=int(quality))
    else:
        PILImage.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def rgb_to_compressed_msg(
    array_: np.ndarray, header: Any = None, fmt: str = "jpeg", quality: int = 90
) -> Any:
    """Build a sensor_msgs/CompressedImage (JPEG or PNG) from an (H, W, 3) uint8 RGB array.

    ``format`` is written like image_transport's compressed publisher for an rgb8 source
    ("rgb8; jpeg compressed bgr8"): the file holds standard colours either way.
    """
    from sensor_msgs.msg import CompressedImage

    data = encode_compressed(array_, fmt, quality)
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = f"rgb8; {compressed_format(fmt)} compressed bgr8"
    msg.data = array.array("B", data)
    return msg

"""Image message <-> RGB array conversions: every encoding, padding, endianness, bad input."""

import array
import io
import types

import numpy as np
import pytest
from PIL import Image as PILImage

from llava_phi_ros.ros.image_conversion import (
    SUPPORTED_ENCODINGS,
    ImageConversionError,
    compressed_format,
    compressed_msg_to_rgb,
    image_msg_to_rgb,
    rgb_to_compressed_msg,
    rgb_to_encoding,
    rgb_to_image_msg,
)

H, W = 6, 10


def _scene(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """A random RGB image with pure red and blue pixels in known places."""
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 0, 255)
    return rgb


def _msg(rgb: np.ndarray, encoding: str, row_padding: int = 0, big_endian: bool = False,
         data_type=bytes) -> types.SimpleNamespace:
    data, step = rgb_to_encoding(rgb, encoding, row_padding=row_padding, big_endian=big_endian)
    if data_type is array.array:
        data = array.array("B", data)
    else:
        data = data_type(data)
    return types.SimpleNamespace(height=rgb.shape[0], width=rgb.shape[1], encoding=encoding,
                                 is_bigendian=int(big_endian), step=step, data=data)


def _luma(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
    return np.floor(0.299 * r + 0.587 * g + 0.114 * b + 0.5)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "8UC3"])
@pytest.mark.parametrize("row_padding", [0, 3])
@pytest.mark.parametrize("data_type", [bytes, bytearray, array.array, memoryview])
def test_colour_encodings_round_trip_exactly(encoding, row_padding, data_type):
    rgb = _scene()
    out = image_msg_to_rgb(_msg(rgb, encoding, row_padding, data_type=data_type))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.owndata and out.flags.writeable
    np.testing.assert_array_equal(out, rgb)
    # No red/blue swap: a red pixel stays red whatever the wire layout.
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (0, 0, 255)


def test_bgr8_bytes_are_read_as_bgr():
    # Hand-built wire bytes, independent of rgb_to_encoding: one pixel B=1, G=2, R=3.
    msg = types.SimpleNamespace(height=1, width=1, encoding="bgr8", is_bigendian=0, step=3,
                                data=bytes([1, 2, 3]))
    assert image_msg_to_rgb(msg).tolist() == [[[3, 2, 1]]]
    msg.encoding = "rgb8"
    assert image_msg_to_rgb(msg).tolist() == [[[1, 2, 3]]]
    msg = types.SimpleNamespace(height=1, width=1, encoding="bgra8", is_bigendian=0, step=4,
                                data=bytes([1, 2, 3, 4]))
    assert image_msg_to_rgb(msg).tolist() == [[[3, 2, 1]]]


@pytest.mark.parametrize("encoding", ["mono8", "8UC1"])
@pytest.mark.parametrize("row_padding", [0, 5])
def test_mono8_is_grey_luma(encoding, row_padding):
    rgb = _scene()
    out = image_msg_to_rgb(_msg(rgb, encoding, row_padding))
    assert out.shape == (H, W, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.abs(out[..., 0].astype(int) - _luma(rgb)).max() <= 1


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("row_padding", [0, 1, 4])
def test_mono16_takes_the_high_byte_honouring_endianness(big_endian, row_padding):
    rgb = _scene()
    msg = _msg(rgb, "mono16", row_padding, big_endian=big_endian)
    out = image_msg_to_rgb(msg)
    assert np.abs(out[..., 0].astype(int) - _luma(rgb)).max() <= 1
    # Hand-built samples: 0x1234 -> 0x12, 0xff00 -> 0xff, 0x00ff -> 0x00.
    samples = np.array([[0x1234, 0xFF00, 0x00FF]], dtype=">u2" if big_endian else "<u2")
    hand = types.SimpleNamespace(height=1, width=3, encoding="mono16",
                                 is_bigendian=int(big_endian), step=6, data=samples.tobytes())
    assert image_msg_to_rgb(hand)[0, :, 0].tolist() == [0x12, 0xFF, 0x00]
    # The wrong endianness flag gives other values: the flag is really honoured.
    hand.is_bigendian = int(not big_endian)
    assert image_msg_to_rgb(hand)[0, :, 0].tolist() == [0x34, 0x00, 0xFF]


def _yuv601_limited_reference(y: float, u: float, v: float) -> tuple[int, int, int]:
    """BT.601 limited range YCbCr -> RGB, the textbook formula (float, round, clamp)."""
    c, d, e = y - 16.0, u - 128.0, v - 128.0
    r = 1.164383 * c + 1.596027 * e
    g = 1.164383 * c - 0.391762 * d - 0.812968 * e
    b = 1.164383 * c + 2.017232 * d
    return tuple(int(min(255, max(0, round(x)))) for x in (r, g, b))


@pytest.mark.parametrize("encoding,order", [("yuv422_yuy2", "YUYV"), ("yuyv", "YUYV"),
                                            ("yuv422", "UYVY")])
def test_yuv422_matches_the_bt601_limited_range_formula(encoding, order):
    rng = np.random.default_rng(3)
    h, w = 5, 8
    raw = rng.integers(0, 256, (h, w * 2), dtype=np.uint8)
    raw[0, :8] = [16, 128, 235, 128, 81, 90, 41, 240]  # black, white, and red in YUYV order
    if order == "UYVY":
        raw[0, :8] = [128, 16, 128, 235, 90, 81, 240, 41]
    msg = types.SimpleNamespace(height=h, width=w, encoding=encoding, is_bigendian=0,
                                step=w * 2, data=raw.tobytes())
    out = image_msg_to_rgb(msg)
    for row in range(h):
        for pair in range(w // 2):
            quad = raw[row, pair * 4:pair * 4 + 4].astype(float)
            if order == "YUYV":
                y0, u, y1, v = quad
            else:
                u, y0, v, y1 = quad
            for k, y in enumerate((y0, y1)):
                expected = _yuv601_limited_reference(y, u, v)
                got = tuple(int(x) for x in out[row, pair * 2 + k])
                assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 1, \
                    (row, pair, k, got, expected)
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)
    r, g, b = (int(x) for x in out[0, 2])
    assert r > 200 and g < 40 and b < 40


def test_yuyv_round_trip_of_a_smooth_image_is_close():
    # 4:2:2 shares chroma between two pixels: pairs of equal pixels survive almost exactly.
    rgb = np.repeat(_scene(8, 8), 2, axis=1)
    out = image_msg_to_rgb(_msg(rgb, "yuv422_yuy2", row_padding=2))
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 3
    assert tuple(out[0, 0])[0] > 240 and tuple(out[0, 0])[2] < 15  # red stays red


def test_odd_width_yuyv_is_refused():
    msg = types.SimpleNamespace(height=2, width=3, encoding="yuv422_yuy2", is_bigendian=0,
                                step=6, data=bytes(12))
    with pytest.raises(ImageConversionError, match="even width"):
        image_msg_to_rgb(msg)
    with pytest.raises(ImageConversionError, match="even width"):
        rgb_to_encoding(np.zeros((2, 3, 3), np.uint8), "yuv422_yuy2")


def test_unsupported_encoding_names_the_supported_ones():
    msg = types.SimpleNamespace(height=1, width=1, encoding="bayer_rggb8", is_bigendian=0,
                                step=1, data=bytes(1))
    with pytest.raises(ImageConversionError) as err:
        image_msg_to_rgb(msg)
    assert "bayer_rggb8" in str(err.value)
    for name in SUPPORTED_ENCODINGS:
        assert name in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("height,width,step,size,match", [
    (2, 2, 6, 11, r"data length 11 != step\*height = 6\*2 = 12"),
    (2, 2, 6, 13, "data length 13"),
    (2, 2, 5, 10, "step 5 is smaller than width"),
    (0, 2, 6, 0, "zero size"),
    (2, 0, 6, 12, "zero size"),
])
def test_inconsistent_geometry_is_refused(height, width, step, size, match):
    msg = types.SimpleNamespace(height=height, width=width, encoding="rgb8", is_bigendian=0,
                                step=step, data=bytes(size))
    with pytest.raises(ImageConversionError, match=match):
        image_msg_to_rgb(msg)


def test_result_does_not_alias_the_message_buffer():
    rgb = _scene()
    msg = _msg(rgb, "rgb8", data_type=bytearray)
    out = image_msg_to_rgb(msg)
    msg.data[:] = bytes(len(msg.data))  # rclpy may reuse the buffer
    np.testing.assert_array_equal(out, rgb)


def test_list_data_is_accepted_and_checked():
    msg = types.SimpleNamespace(height=1, width=1, encoding="rgb8", is_bigendian=0, step=3,
                                data=[1, 2, 3])
    assert image_msg_to_rgb(msg).tolist() == [[[1, 2, 3]]]
    msg.data = [1, 2, 300]
    with pytest.raises(ImageConversionError, match="0..255"):
        image_msg_to_rgb(msg)


def test_real_sensor_msgs_image_from_the_wire():
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    rgb = _scene(48, 64)
    header = Header(frame_id="cam_optical")
    header.stamp.sec, header.stamp.nanosec = 12, 345
    msg = rgb_to_image_msg(rgb, header)
    assert (msg.encoding, msg.step, msg.height, msg.width) == ("rgb8", 192, 48, 64)
    assert msg.header.frame_id == "cam_optical" and msg.header.stamp.nanosec == 345
    received = deserialize_message(serialize_message(msg), Image)
    assert isinstance(received.data, array.array)  # what a subscription callback gets
    np.testing.assert_array_equal(image_msg_to_rgb(received), rgb)
    for encoding in ("bgr8", "bgra8", "mono16", "yuv422_yuy2"):
        data, step = rgb_to_encoding(rgb, encoding, row_padding=2)
        wire = Image(height=48, width=64, encoding=encoding, step=step,
                     data=array.array("B", data))
        out = image_msg_to_rgb(deserialize_message(serialize_message(wire), Image))
        assert out.shape == rgb.shape


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_compressed_round_trip(fmt):
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import CompressedImage

    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (230, 20, 20)  # red left half
    rgb[:, 24:] = (20, 20, 230)  # blue right half
    msg = rgb_to_compressed_msg(rgb, fmt=fmt)
    assert msg.format == f"rgb8; {fmt} compressed bgr8"
    received = deserialize_message(serialize_message(msg), CompressedImage)
    out = compressed_msg_to_rgb(received)
    assert out.shape == rgb.shape and out.dtype == np.uint8 and out.flags.writeable
    tol = 0 if fmt == "png" else 12
    assert np.abs(out[4:-4, 4:20].astype(int) - rgb[4:-4, 4:20]).max() <= tol
    assert np.abs(out[4:-4, 28:44].astype(int) - rgb[4:-4, 28:44]).max() <= tol


@pytest.mark.parametrize("fmt,expected", [
    ("jpeg", "jpeg"), ("JPEG", "jpeg"), ("jpg", "jpeg"), ("rgb8; jpeg compressed bgr8", "jpeg"),
    ("png", "png"), ("bgr8; png compressed bgr8", "png"), ("mono16; png compressed mono16", "png"),
])
def test_compressed_format_strings(fmt, expected):
    assert compressed_format(fmt) == expected


@pytest.mark.parametrize("fmt", ["tiff", "16UC1; compressedDepth png", "theora"])
def test_unsupported_compressed_formats(fmt):
    msg = types.SimpleNamespace(format=fmt, data=b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ImageConversionError, match="unsupported compressed format"):
        compressed_msg_to_rgb(msg)


def test_empty_format_is_sniffed_from_magic_bytes():
    rgb = _scene(8, 8)
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="PNG")
    msg = types.SimpleNamespace(format="", data=buf.getvalue())
    np.testing.assert_array_equal(compressed_msg_to_rgb(msg), rgb)
    msg.data = b"GIF89a...."
    with pytest.raises(ImageConversionError, match="neither JPEG nor PNG"):
        compressed_msg_to_rgb(msg)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_corrupt_compressed_data(fmt):
    good = rgb_to_compressed_msg(_scene(64, 64), fmt=fmt)
    for data in (b"", b"not an image at all", bytes(good.data)[: len(good.data) // 2]):
        msg = types.SimpleNamespace(format=fmt, data=data)
        with pytest.raises(ImageConversionError, match=f"{fmt}"):
            compressed_msg_to_rgb(msg)
    # JPEG data labelled as PNG (and vice versa) is refused, not guessed.
    other = "png" if fmt == "jpeg" else "jpeg"
    with pytest.raises(ImageConversionError, match="corrupt"):
        compressed_msg_to_rgb(types.SimpleNamespace(format=other, data=bytes(good.data)))


def test_mono16_png_is_scaled_like_raw_mono16():
    samples = np.array([[0x1234, 0xFF00, 0x00FF, 0x8080]], dtype=np.uint16)
    buf = io.BytesIO()
    PILImage.fromarray(samples).save(buf, format="PNG")
    msg = types.SimpleNamespace(format="mono16; png compressed mono16", data=buf.getvalue())
    assert compressed_msg_to_rgb(msg)[0, :, 1].tolist() == [0x12, 0xFF, 0x00, 0x80]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_compressed_non_rgb_modes_become_rgb(mode):
    img = PILImage.fromarray(_scene(8, 8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = compressed_msg_to_rgb(types.SimpleNamespace(format="png", data=buf.getvalue()))
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))


def test_rgb_array_validation():
    for bad in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ImageConversionError, match="RGB array"):
            rgb_to_image_msg(bad)
    with pytest.raises(ImageConversionError, match="uint8"):
        rgb_to_encoding(np.zeros((2, 2, 3), np.float32), "rgb8")
    with pytest.raises(ImageConversionError, match="row_padding"):
        rgb_to_encoding(np.zeros((2, 2, 3), np.uint8), "rgb8", row_padding=-1)


def test_rgb_to_image_msg_accepts_non_contiguous_input():
    rgb = _scene(10, 12)
    view = rgb[::2, ::3]
    msg = rgb_to_image_msg(view)
    assert (msg.height, msg.width, msg.step) == (5, 4, 12)
    np.testing.assert_array_equal(image_msg_to_rgb(msg), view)

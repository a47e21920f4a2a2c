"""Preprocessing on the model's device (a GPU): pad, resize, crop and normalise in torch.

The exact path (preprocess.py: PIL's bicubic, bit-exact with CLIPImageProcessor) costs several
milliseconds of CPU per 1080p frame. This path does the same steps on the device with torch's
antialiased bicubic (the same a = -0.5 kernel and support as PIL's), rounding to uint8 levels
where PIL does. It is close, not equal: DEVICE_TOLERANCE_LEVELS says how close
(test/test_preprocess.py holds it to that on camera-sized frames).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .preprocess import ImagePreprocessConfig, _shortest_edge_size, _to_pil, center_crop_layout

# Difference from the exact CPU path, in uint8 levels of the resized image (pixel values differ
# by levels / 255 / std): PIL resizes in fixed point, torch in fp32, so a value that lands near
# .5 can round the other way. Measured on scenes and on uniform noise (the worst case) from
# 200x300 up to 1920x1080: at most 2 levels (a flip in the first pass, carried into the
# second), on average under 0.01 level.
DEVICE_TOLERANCE_LEVELS = 2
DEVICE_MEAN_LEVELS = 0.01


def preprocess_on_device(image: Image.Image | np.ndarray, cfg: ImagePreprocessConfig,
                         device: torch.device | str) -> torch.Tensor:
    """PIL image or (H, W, 3) uint8 RGB array -> float32 (3, S, S) pixel values on `device`."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 \
            and image.shape[2] == 3 and image.size:
        rgb = image  # the camera's frame as is: no PIL round trip
    else:
        rgb = np.asarray(_to_pil(image))  # validated, converted to RGB
    rgb = np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:  # torch wants a writable array (a decoded message's may not be)
        rgb = rgb.copy()
    x = torch.from_numpy(rgb).to(device).permute(2, 0, 1).float()  # (3, H, W)
    _, h, w = x.shape
    if cfg.pad_to_square and h != w:
        side = max(h, w)
        canvas = torch.tensor(cfg.background_rgb, dtype=torch.float32, device=x.device)
        canvas = canvas[:, None, None].expand(3, side, side).clone()
        top, left = (side - h) // 2, (side - w) // 2
        canvas[:, top:top + h, left:left + w] = x
        x, h, w = canvas, side, side
    if cfg.do_resize:
        nh, nw = _shortest_edge_size(h, w, cfg.shortest_edge)
        # as PIL: the horizontal pass, stored as uint8, then the vertical pass
        for size in ((h, nw), (nh, nw)):
            x = F.interpolate(x[None], size=size, mode="bicubic", antialias=True,
                              align_corners=False)[0].round().clamp(0, 255)
        h, w = nh, nw
    if cfg.do_center_crop:
        size = cfg.image_size
        nh, nw, ph, pw, top, left = center_crop_layout(h, w, size)
        if (nh, nw) != (h, w):  # the rare too-small case: the exact path's zero padding
            padded = torch.zeros((3, nh, nw), device=x.device)
            padded[:, ph:ph + h, pw:pw + w] = x
            x = padded
        x = x[:, top:top + size, left:left + size]
    if cfg.do_rescale:
        x = x * cfg.rescale_factor
    if cfg.do_normalize:
        mean = torch.tensor(cfg.image_mean, device=x.device)[:, None, None]
        std = torch.tensor(cfg.image_std, device=x.device)[:, None, None]
        x = (x - mean) / std
    return x.contiguous()

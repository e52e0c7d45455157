"""Image and mask preprocessing for CLIP: bicubic resize, CLIP mean/std.

docs/reproduction.md, "Backbone".

Masks are resized bilinearly and thresholded at 0.5, so a mask stays binary at any size.

    >>> import numpy as np
    >>> x = image_to_tensor(np.zeros((40, 30, 3), np.uint8), 28)
    >>> tuple(x.shape)
    (3, 28, 28)
    >>> m = mask_to_tensor(np.pad(np.ones((10, 10)), 5), 40)
    >>> tuple(m.shape), sorted(m.unique().tolist())
    ((40, 40), [0.0, 1.0])
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP's normalisation constants (open_clip.constants.OPENAI_DATASET_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pil_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """Any PIL image or array (gray, RGBA, palette, 16-bit, float in [0, 1]) as 8-bit RGB."""
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            image = np.asarray(image)
        else:
            return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.max(initial=0) > 255):
        arr = (arr.astype(np.float64) / max(int(arr.max(initial=1)), 1) * 255).round()
    elif arr.dtype.kind == "f":
        arr = np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255).round()
    arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return Image.fromarray(arr, "RGB")


def image_to_tensor(image: Image.Image | np.ndarray, size: int) -> torch.Tensor:
    """(3, size, size) float tensor: bicubic resize, scale to [0, 1], CLIP mean/std."""
    pil = to_pil_rgb(image).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def mask_to_tensor(mask: Image.Image | np.ndarray | None, size: int) -> torch.Tensor:
    """(size, size) float tensor of 0/1: bilinear resize, then threshold 0.5. None -> zeros."""
    if mask is None:
        return torch.zeros(size, size)
    arr = np.asarray(mask, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    if arr.max(initial=0) > 1:
        arr = arr / arr.max()
    pil = Image.fromarray(arr.astype(np.float32), "F").resize((size, size), Image.BILINEAR)
    return torch.from_numpy((np.asarray(pil) >= 0.5).astype(np.float32))


def denormalize(x: torch.Tensor) -> np.ndarray:
    """Undo CLIP normalisation: (3, H, W) or (N, 3, H, W) tensor -> HWC float array in [0, 1]."""
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(3, 1, 1)
    y = (x.detach().float() * std + mean).clamp(0, 1)
    return y.movedim(-3, -1).cpu().numpy()

"""The pose condition: 5 landmarks rasterised into a 5-channel image beside x_t.

Channel j holds a Gaussian blob exp(-|p - l_j|^2 / (2 sigma^2)) around landmark j (left eye,
right eye, nose, left and right mouth corner), in pixel coordinates of the image the denoiser
sees; sigma scales with the image (2 px at 112). Landmarks given in a source_size frame (112 unless
said) are rescaled to `size`. Pixel centres sit at integer coordinates, as in `vigface.data.align`, so a
point x in the source frame is at (x + 0.5) * size / source_size - 0.5. A landmark that is NaN
(unknown) gives an empty channel.

Tables kept for generation (a denoiser folder's pose_landmarks.npy) are in the 112 frame, whatever
size the training images were stored at: `rescale_landmarks` moves them there.
"""

from __future__ import annotations

import torch


def rescale_landmarks(landmarks, source_size: int, size: int):
    """Landmarks (x, y) in a source_size x source_size frame -> the same points in a size frame
    (pixel centres at integer coordinates in both). Works on tensors and arrays alike."""
    if size == source_size:
        return landmarks  # bit for bit: (x + 0.5) - 0.5 need not round back to x
    return (landmarks + 0.5) * (size / source_size) - 0.5


def landmark_image(
    landmarks: torch.Tensor, size: int, source_size: int = 112, sigma: float | None = None
) -> torch.Tensor:
    """(N, 5, 2) landmarks (x, y) in a source_size frame -> (N, 5, size, size) float in [0, 1]."""
    if sigma is None:  # 2 px at 112, relative to the image whatever frame the landmarks came in
        sigma = 2.0 * size / 112
    pts = rescale_landmarks(landmarks.float(), source_size, size)  # (N, 5, 2)
    coords = torch.arange(size, dtype=torch.float32, device=landmarks.device)
    dx = coords.view(1, 1, 1, size) - pts[..., 0, None, None]  # (N, 5, 1, size)
    dy = coords.view(1, 1, size, 1) - pts[..., 1, None, None]  # (N, 5, size, 1)
    image = torch.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma))
    return torch.nan_to_num(image, nan=0.0)

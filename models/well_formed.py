"""Is an image what the shapes model is meant to draw: one solid shape on a flat background?

The judge's CNN (judge.py) always names one of its six shapes, whatever it is shown. Shown
fragments (several small blobs, streaks), it tends to say "star", the one shape with spikes.
A LoRA or token that breaks the model's drawing could then score as a star it never drew
(seen 2026-11-27: a pivotal-tuning run judged 97% star drew scattered specks). So a hit needs
the image to be well formed as well as named right.

The test follows how models/shapes.py renders every scene: a background of one colour, and one
filled, connected shape at least MIN_RADIUS across. Pixels far from the background's colour (the
median of the border) are the foreground; the largest connected part of it must hold nearly all
of it and be big enough to be a shape. Rendered scenes and the shipped model's own
images of the base classes pass (tests/unit/test_judge.py); specks and streaks do not.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# A pixel is foreground when its RGB distance from the background colour is at least
# FOREGROUND_DISTANCE, or half the farthest pixel's where the whole shape is dim (the model draws
# some purple crosses on gray only 99 from it): a fixed cut would break those into pieces, and a
# purely relative one would cut off a bright star's blurred tips.
FOREGROUND_DISTANCE = 80.0
FOREGROUND_SHARE = 0.5
MIN_FOREGROUND_DISTANCE = 30.0  # below this, nothing stands out from the background at all
# The largest connected part's share of the foreground: one shape, not pieces of several.
MIN_LARGEST_SHARE = 0.9
# Pixels of that part, in the judge's 64x64 images. The smallest rendered shape (a star of radius
# MIN_RADIUS) covers about 290; half of that allows for the model's softer edges.
MIN_SHAPE_PIXELS = 150


def well_formed(image: np.ndarray) -> bool:
    """image: uint8 (64, 64, 3), as the judge takes it. True for one solid shape on a flat background."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    cut = max(MIN_FOREGROUND_DISTANCE, min(FOREGROUND_DISTANCE, FOREGROUND_SHARE * float(distance.max())))
    foreground = distance >= cut
    labels, count = ndimage.label(foreground)
    if count == 0:
        return False
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(sizes.max())
    return largest >= MIN_SHAPE_PIXELS and largest >= MIN_LARGEST_SHARE * int(sizes.sum())

"""The one mask rule: from probabilities to a mask.

One class: foreground where the probability is at least the threshold (0.5 unless the user sets one). Several
classes: the argmax over the classes (0 = background). Prediction, its zoomed-back output, the Segment widget's
planes, validation during fine-tuning, object scores and the CLI's before/after table all call :func:`mask_from`, so
what a user sees, what is scored and what is written cannot disagree.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["mask_from"]


def mask_from(prob: Any, num_classes: int, threshold: float = 0.5, class_axis: int = 0) -> Any:
    """The mask of probabilities ``prob``.

    Args:
        prob: For one class, the foreground probabilities (no class axis); for several, the class probabilities with
            the classes along ``class_axis``.
        num_classes: The model's number of classes (1 = a foreground/background model).
        threshold: Foreground cut for one class (default 0.5); unused for several classes.
        class_axis: Where the classes are, for several classes (default 0).

    Returns:
        A bool array (one class) or the class index per pixel (several classes); for a tensor ``prob``, a tensor on
        its device.
    """
    if isinstance(prob, torch.Tensor):  # the device pipeline's: the same rule, where the tensor is
        return prob >= threshold if num_classes == 1 else torch.argmax(prob, dim=class_axis)
    if num_classes == 1:
        return np.asarray(prob) >= threshold
    return np.argmax(prob, axis=class_axis)

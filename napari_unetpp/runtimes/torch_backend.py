"""The network run by PyTorch itself: what every device and precision can run, and what the other runtimes are
measured against."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from napari_unetpp.model.network import probabilities
from napari_unetpp.runtimes.base import Backend, Choice
from napari_unetpp.runtimes.device import autocast_context, memory_format

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    """The network in PyTorch (autocast where it pays, channels-last)."""

    def __init__(self, net: Any, depth: int, device: torch.device, precision: str, choice: Choice) -> None:
        self.net, self.depth, self.device, self.precision, self.choice = net, depth, device, precision, choice
        self.num_classes, self.cue = net.config.num_classes, net.config.has_cue
        self.fmt = memory_format(net, device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast_context(self.device, self.precision):
            t = torch.from_numpy(x).to(self.device, non_blocking=True).contiguous(memory_format=self.fmt)
            outs = self.net(t, depth=self.depth, cue=True) if self.cue else self.net(t, depth=self.depth)
            logits = torch.stack(outs, dim=1).float()  # (B, k, classes [+ cue], ...)
            return probabilities(logits, self.num_classes, dim=2).cpu().numpy()

"""The exported ONNX graph that ONNX Runtime and OpenVINO run, cached on disk under a hash of its parameters.

The exported graph is the inference copy of the network at depth k (batch norm folded, only the nodes with
``i + j <= k``) returning the probabilities of heads 1..k (and the cue), stacked: the same array the PyTorch runtime
(:class:`~napari_unetpp.runtimes.torch_backend.TorchBackend`) returns. Batch and spatial sizes are dynamic. It is
cached on disk (``cache_dir()/onnx``) under a hash of the parameters it holds, so changed weights (a fine-tuned
model) never reuse a stale export.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_unetpp.model.network import probabilities
from napari_unetpp.paths import cache_dir
from napari_unetpp.runtimes.base import RuntimeUnavailable, onnx_available, written_atomically

__all__ = ["onnx_graph", "params_hash"]

log = logging.getLogger(__name__)
_HASHES: weakref.WeakKeyDictionary[nn.Module, dict[int, str]] = weakref.WeakKeyDictionary()


class _Heads(nn.Module):
    """What the exported graph computes: the nodes of depth k (no pad/crop: inputs are multiples of the pooling,
    as ``predict``'s tiles are) and heads 1..k (with the cue), activated and stacked on axis 1."""

    def __init__(self, net: Any, depth: int) -> None:
        super().__init__()
        self.net, self.depth = net, depth
        self.num_classes, self.cue = net.config.num_classes, net.config.has_cue

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(self.net(x, depth=self.depth, cue=self.cue, pad=False), dim=1)
        return probabilities(stacked, self.num_classes, dim=2)


def params_hash(net: Any, depth: int) -> str:
    """SHA-256 (16 hex digits) of the parameters and buffers the depth-``depth`` graph uses, and the architecture.
    Memoised per network object: inference copies are never modified in place (a new copy follows new weights)."""
    memo = _HASHES.setdefault(net, {})
    if depth not in memo:
        memo[depth] = _params_hash(net, depth)
    return memo[depth]


def _params_hash(net: Any, depth: int) -> str:
    h = hashlib.sha256(json.dumps(net.config.to_dict(), sort_keys=True).encode())
    h.update(f"depth={depth}".encode())
    for name, mod in net.modules_for_depth(depth):
        for k, v in mod.state_dict().items():
            h.update(f"{name}.{k}".encode())
            h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def onnx_graph(net: Any, depth: int) -> Path:
    """The exported fp32 graph of ``net`` (an inference copy: batch norm folded) at ``depth``, from the disk cache
    or exported now (a few seconds at L4). Written to a temporary name and renamed, so readers never see half a file.

    Raises:
        RuntimeUnavailable: onnx is not installed or the export failed.
    """
    missing = onnx_available()
    if missing:
        raise RuntimeUnavailable(missing)
    path = cache_dir() / "onnx" / f"{params_hash(net, depth)}-L{depth}.onnx"
    if path.is_file():
        return path
    dims = net.config.spatial_dims
    mult = net.config.multiple
    sp = ["z", "y", "x"][-dims:]
    example = torch.zeros((1, net.config.in_channels, *[2 * m for m in mult]))
    module = _Heads(_contiguous_copy(net), depth).eval()
    t0 = time.perf_counter()

    def export(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                opset_version=17,
                dynamo=False,
                input_names=["x"],
                output_names=["p"],
                dynamic_axes={"x": {0: "b", **{2 + i: a for i, a in enumerate(sp)}}, "p": {0: "b"}},
            )

    written_atomically(path, export, "the ONNX export")
    log.info("exported L%d to ONNX in %.1f s: %s", depth, time.perf_counter() - t0, path)
    return path


def _contiguous_copy(net: Any) -> nn.Module:
    return copy.deepcopy(net).cpu().float().to(memory_format=torch.contiguous_format)

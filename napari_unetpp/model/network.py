"""UNet++ (Zhou et al. 2018, 2019) with deep supervision and true pruning at inference, and the plain U-Net it is
compared with.

Node X(i, j) of the paper is the module ``nodes["x_{i}_{j}"]``: ``i`` is the resolution level (0 = full
resolution), ``j`` the column. Encoder nodes X(i, 0) take the max-pooled X(i-1, 0); nested nodes X(i, j), j >= 1,
take the concatenation of X(i, 0), ..., X(i, j-1) and the upsampled X(i+1, j-1). A 1x1 head ``heads["head_{j}"]``
sits on each top node X(0, j). The sub-network of depth k is made of the nodes with ``i + j <= k``: it is a complete
segmenter, and ``forward(x, depth=k)`` evaluates those nodes only.

The architecture (:class:`~napari_unetpp.model.config.UNetPlusPlusConfig`) is in :mod:`napari_unetpp.model.config`,
the blocks (convolutions, upsampling, nodes) in :mod:`napari_unetpp.model.blocks`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_unetpp.inference.tiling import padding_for
from napari_unetpp.model.blocks import Node, conv_type, init_weights, pools_for
from napari_unetpp.model.config import UNetPlusPlusConfig, node_names

__all__ = ["UNetPlusPlus", "PrunedUNetPlusPlus", "UNet", "count_parameters", "probabilities", "run_nodes"]


def _pad_to_multiple(x: torch.Tensor, multiple: int | tuple[int, ...]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad spatial dims up to a multiple (reflecting where the image is large enough); return the crop back."""
    spatial = [int(n) for n in x.shape[2:]]
    widths = padding_for(spatial, multiple)
    crop = (slice(None), slice(None), *(slice(a, a + n) for (a, _), n in zip(widths, spatial)))
    pads = [p for pair in reversed(widths) for p in pair]  # F.pad lists the last axis first
    if not any(pads):
        return x, crop
    mode = "reflect" if all(max(a, b) < n for (a, b), n in zip(widths, spatial)) else "replicate"
    return F.pad(x, pads, mode=mode), crop


def run_nodes(
    nodes: nn.ModuleDict, x: torch.Tensor, depth: int, pools: nn.ModuleList
) -> dict[tuple[int, int], torch.Tensor]:
    """Evaluate exactly the nodes with ``i + j <= depth``; return their outputs by (i, j)."""
    out: dict[tuple[int, int], torch.Tensor] = {}
    for name in node_names(depth):
        _, si, sj = name.split("_")
        i, j = int(si), int(sj)
        node = nodes[name]
        if j == 0:
            out[i, 0] = node([], x if i == 0 else pools[i - 1](out[i - 1, 0]))
        else:
            out[i, j] = node([out[i, c] for c in range(j)], out[i + 1, j - 1])
        if j >= 1 and i + j == depth:
            # X(i, j) was the last consumer of row i+1 (its last node X(i+1, j-1) and its skips): free it
            for c in range(j):
                out.pop((i + 1, c), None)
    return out


class _ConfiguredNet(nn.Module):
    """What UNet++ and the plain U-Net share: the constructor arguments (kept as :class:`UNetPlusPlusConfig`, which
    model cards store), the pooling layer and ``from_config``."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        features: tuple[int, ...] = (32, 64, 128, 256, 512),
        spatial_dims: int = 2,
        norm: str = "none",
        dropout: float = 0.0,
        upsample: str = "transpose",
        activation: str = "relu",
        groups: int = 8,
        pool: Any = None,
        cue: str = "none",
    ) -> None:
        super().__init__()
        self.config = UNetPlusPlusConfig(
            in_channels,
            num_classes,
            tuple(features),
            spatial_dims,
            norm,
            dropout,
            upsample,
            activation,
            groups,
            pool,
            cue,
        )
        self.pools = pools_for(self.config)

    @classmethod
    def from_config(cls, config: UNetPlusPlusConfig | dict[str, Any]):
        """Build from a :class:`UNetPlusPlusConfig` or its dict form."""
        if isinstance(config, dict):
            config = UNetPlusPlusConfig.from_dict(config)
        return cls(**{k: getattr(config, k) for k in config.to_dict()})


class UNetPlusPlus(_ConfiguredNet):
    """Nested U-Net with deep supervision whose sub-networks of depth 1..max_depth can be pruned at inference.

    Args:
        in_channels: Input channels (default 1).
        num_classes: 1 = sigmoid foreground head, > 1 = softmax classes (default 1).
        features: Filters per level, ``len - 1`` = maximum depth (default ``(32, 64, 128, 256, 512)``).
        spatial_dims: 2 or 3 (default 2).
        norm: ``"none"``, ``"batch"``, ``"instance"`` or ``"group"`` (default ``"none"``).
        dropout: Dropout after every convolution (default 0.0).
        upsample: ``"transpose"``, ``"nearest"`` or ``"linear"`` (default ``"transpose"``).
        activation: ``"relu"`` or ``"leaky_relu"`` (default ``"relu"``).
        groups: Groups for group normalisation (default 8).
        pool: Pooling factors per level (see :class:`UNetPlusPlusConfig`).
        cue: ``"none"`` (default) or ``"distance"``: an instance-cue head beside each class head (see
            :class:`UNetPlusPlusConfig`); ``forward(x, cue=True)`` appends its logits as the last channel.

    Inputs of any size work: they are padded to a multiple of ``2 ** max_depth`` (the same padding for every
    depth, so head k gives the same output whatever depth was asked for) and cropped back.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        features: tuple[int, ...] = (32, 64, 128, 256, 512),
        spatial_dims: int = 2,
        norm: str = "none",
        dropout: float = 0.0,
        upsample: str = "transpose",
        activation: str = "relu",
        groups: int = 8,
        pool: Any = None,
        cue: str = "none",
    ) -> None:
        super().__init__(
            in_channels, num_classes, features, spatial_dims, norm, dropout, upsample, activation, groups, pool, cue
        )
        cfg = self.config
        self.nodes = nn.ModuleDict({n: Node(cfg, *map(int, n.split("_")[1:])) for n in node_names(cfg.max_depth)})
        conv = conv_type(cfg.spatial_dims)
        self.heads = nn.ModuleDict(
            {f"head_{j}": conv(cfg.features[0], cfg.num_classes, 1) for j in range(1, cfg.max_depth + 1)}
        )
        if cfg.has_cue:
            self.cues = nn.ModuleDict({f"cue_{j}": conv(cfg.features[0], 1, 1) for j in range(1, cfg.max_depth + 1)})
        init_weights(self)

    @classmethod
    def paper(cls, in_channels: int = 1, num_classes: int = 1) -> UNetPlusPlus:
        """The published configuration: filters 32/64/128/256/512, two 3x3 conv + ReLU + dropout 0.5 per node,
        no normalisation, 2x2 stride-2 transposed-convolution upsampling, sigmoid (or softmax) heads."""
        return cls(in_channels, num_classes, (32, 64, 128, 256, 512), 2, "none", 0.5, "transpose", "relu")

    @property
    def max_depth(self) -> int:
        """Deepest available sub-network."""
        return self.config.max_depth

    def check_depth(self, depth: int | None) -> int:
        """Return ``depth`` (or the maximum when None) after checking it is in 1..max_depth."""
        if depth is None:
            return self.max_depth
        if not 1 <= int(depth) <= self.max_depth:
            raise ValueError(f"depth must be between 1 and {self.max_depth}, got {depth}.")
        return int(depth)

    def forward(
        self, x: torch.Tensor, depth: int | None = None, cue: bool = False, pad: bool = True
    ) -> list[torch.Tensor]:
        """Logits of heads 1..k (k = ``depth`` or the maximum), evaluating only the nodes with ``i + j <= k``.

        This is the one place heads 1..k are computed: the PyTorch runtime, the exported ONNX graph and training
        all call it (activate them with :func:`probabilities`).

        Args:
            x: ``(N, C, H, W)`` or ``(N, C, D, H, W)`` tensor of any spatial size.
            depth: Sub-network depth k in 1..max_depth (default: max_depth).
            cue: Append the instance cue's logits as one more channel (models built with a ``cue`` only).
            pad: Pad to a multiple of the pooling and crop back (default True). ``False`` for inputs that already
                are multiples (predict's tiles), as an exported graph needs: a trace would freeze the padding.

        Returns:
            List of k logit tensors ``(N, num_classes [+ 1], *spatial)``, head 1 first.
        """
        k = self.check_depth(depth)
        if cue and not self.config.has_cue:
            raise ValueError("this model has no instance cue (it was built with cue='none').")
        _check_input(x, self.config)
        xp, crop = _pad_to_multiple(x, self.config.multiple) if pad else (x, (slice(None),) * x.ndim)
        outs = run_nodes(self.nodes, xp, k, self.pools)
        if cue:
            return [
                torch.cat([self.heads[f"head_{j}"](outs[0, j]), self.cues[f"cue_{j}"](outs[0, j])], 1)[crop]
                for j in range(1, k + 1)
            ]
        return [self.heads[f"head_{j}"](outs[0, j])[crop] for j in range(1, k + 1)]

    def modules_for_depth(self, depth: int) -> Iterator[tuple[str, nn.Module]]:
        """The named top-level modules (nodes, poolings and heads) that the depth-``depth`` forward uses."""
        for n in node_names(self.check_depth(depth)):
            yield f"nodes.{n}", self.nodes[n]
        for i in range(depth):  # pooling into levels 1..depth (no parameters)
            yield f"pools.{i}", self.pools[i]
        for j in range(1, depth + 1):
            yield f"heads.head_{j}", self.heads[f"head_{j}"]
            if self.config.has_cue:
                yield f"cues.cue_{j}", self.cues[f"cue_{j}"]

    def pruned(self, depth: int) -> PrunedUNetPlusPlus:
        """Standalone copy of the depth-``depth`` sub-network (the paper's UNet++ L_k) whose forward returns
        head k's logits (and cue k's as the last channel, for a model with a cue); it holds only the parameters that
        level needs."""
        k = self.check_depth(depth)
        return PrunedUNetPlusPlus(
            self.config,
            k,
            {n: self.nodes[n] for n in node_names(k)},
            self.heads[f"head_{k}"],
            self.config.multiple,
            self.cues[f"cue_{k}"] if self.config.has_cue else None,
        )


class PrunedUNetPlusPlus(nn.Module):
    """UNet++ L_k: only the nodes with ``i + j <= k`` and head k, for export and deployment.

    Build it with :meth:`UNetPlusPlus.pruned`. ``forward(x)`` returns head k's logits, with cue k's appended as the
    last channel when the model has an instance cue.
    """

    def __init__(
        self,
        config: UNetPlusPlusConfig,
        depth: int,
        nodes: dict[str, nn.Module],
        head: nn.Module,
        pad_multiple: int | tuple[int, ...],
        cue: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.depth = depth
        self.pad_multiple = pad_multiple
        self.nodes = nn.ModuleDict({n: copy.deepcopy(m) for n, m in nodes.items()})
        self.head = copy.deepcopy(head)
        self.cue = copy.deepcopy(cue) if cue is not None else None
        self.pools = pools_for(config)

    def forward(self, x: torch.Tensor, pad: bool = True) -> torch.Tensor:
        """Head k's logits ``(N, num_classes [+ 1 cue], *spatial)``; ``pad`` as in :meth:`UNetPlusPlus.forward`."""
        _check_input(x, self.config)
        xp, crop = _pad_to_multiple(x, self.pad_multiple) if pad else (x, (slice(None),) * x.ndim)
        outs = run_nodes(self.nodes, xp, self.depth, self.pools)
        top = outs[0, self.depth]
        if self.cue is not None:
            return torch.cat([self.head(top), self.cue(top)], 1)[crop]
        return self.head(top)[crop]


class UNet(_ConfiguredNet):
    """A plain U-Net (Ronneberger et al. 2015) built from the same blocks, as the baseline UNet++ is compared with.

    Encoder nodes are X(i,0) as in UNet++. The decoder node of level i takes X(i,0) and the upsampled decoder output
    of level i+1: one skip per level, no nested nodes, one head. ``forward`` returns ``[logits]``, so training and
    validation code can treat it like a network with one output level. Same arguments as :class:`UNetPlusPlus`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        features: tuple[int, ...] = (32, 64, 128, 256, 512),
        spatial_dims: int = 2,
        norm: str = "none",
        dropout: float = 0.0,
        upsample: str = "transpose",
        activation: str = "relu",
        groups: int = 8,
        pool: Any = None,
        cue: str = "none",
    ) -> None:
        super().__init__(
            in_channels, num_classes, features, spatial_dims, norm, dropout, upsample, activation, groups, pool, cue
        )
        cfg = self.config
        if cfg.has_cue:
            raise ValueError("the plain U-Net baseline has no instance cue; use UNetPlusPlus.")
        self.encoder = nn.ModuleList([Node(cfg, i, 0) for i in range(cfg.max_depth + 1)])
        self.decoder = nn.ModuleList([Node(cfg, i, 1) for i in range(cfg.max_depth)])  # decoder[i]: level i
        self.head = conv_type(cfg.spatial_dims)(cfg.features[0], cfg.num_classes, 1)
        init_weights(self)

    def forward(self, x: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        """``[logits]`` of the full-depth U-Net (``depth`` is accepted for interface compatibility and ignored)."""
        _check_input(x, self.config)
        xp, crop = _pad_to_multiple(x, self.config.multiple)
        skips: list[torch.Tensor] = []
        h = xp
        for i, enc in enumerate(self.encoder):
            h = enc([], h if i == 0 else self.pools[i - 1](skips[-1]))
            skips.append(h)
        for i in range(self.config.max_depth - 1, -1, -1):
            h = self.decoder[i]([skips[i]], h)
        return [self.head(h)[crop]]


def probabilities(logits: torch.Tensor, num_classes: int, dim: int = 1) -> torch.Tensor:
    """Heads' logits to probabilities: the sigmoid for a 1-class model, the softmax over ``dim`` otherwise. The
    one activation rule (PyTorch runtime, exported graphs, bioimage.io packages, validation).

    A model with an instance cue has one class, so its cue channel (after the class) gets the sigmoid too."""
    return torch.sigmoid(logits) if num_classes == 1 else torch.softmax(logits, dim=dim)


def _check_input(x: torch.Tensor, cfg: UNetPlusPlusConfig) -> None:
    want = cfg.spatial_dims + 2
    if x.ndim != want:
        raise ValueError(
            f"expected a {want}-D tensor (N, C, {'D, ' if want == 5 else ''}H, W), got shape {tuple(x.shape)}."
        )
    if x.shape[1] != cfg.in_channels:
        raise ValueError(f"the model expects {cfg.in_channels} input channel(s), got {x.shape[1]}.")


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())

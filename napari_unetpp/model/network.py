"""UNet++ (Zhou et al. 2018, 2019) with deep supervision and true pruning at inference.

Node X(i, j) of the paper is the module ``nodes["x_{i}_{j}"]``: ``i`` is the resolution level (0 = full
resolution), ``j`` the column. Encoder nodes X(i, 0) take the max-pooled X(i-1, 0); nested nodes X(i, j), j >= 1,
take the concatenation of X(i, 0), ..., X(i, j-1) and the upsampled X(i+1, j-1). A 1x1 head ``heads["head_{j}"]``
sits on each top node X(0, j). The sub-network of depth k is made of the nodes with ``i + j <= k``: it is a complete
segmenter, and ``forward(x, depth=k)`` evaluates those nodes only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_unetpp.inference.tiling import padding_for

__all__ = ["UNetPlusPlusConfig", "UNetPlusPlus", "PrunedUNetPlusPlus", "node_names", "probabilities", "run_nodes"]

NORMS = ("none", "batch", "instance", "group")
UPSAMPLES = ("transpose", "nearest", "linear")
ACTIVATIONS = ("relu", "leaky_relu")
CUES = ("none", "distance")


@dataclass
class UNetPlusPlusConfig:
    """Architecture of a UNet++; stored verbatim in every model card.

    Attributes:
        in_channels: Input channels (default 1).
        num_classes: Output classes; 1 means a sigmoid foreground head, > 1 a softmax over classes (default 1).
        features: Filters per resolution level; ``len(features) - 1`` is the maximum depth
            (default ``(32, 64, 128, 256, 512)``, the paper's, depth 4).
        spatial_dims: 2 for images, 3 for volumes (default 2).
        norm: ``"none"`` (paper), ``"batch"``, ``"instance"`` or ``"group"`` (default ``"none"``).
        dropout: Dropout after each convolution; the paper uses 0.5 (default 0.0).
        upsample: ``"transpose"`` (paper: 2x2 stride-2 transposed convolution), ``"nearest"`` or ``"linear"``
            (interpolation followed by a 1x1 convolution) (default ``"transpose"``).
        activation: ``"relu"`` (paper) or ``"leaky_relu"`` (default ``"relu"``).
        groups: Groups for ``norm="group"`` (default 8).
        pool: Pooling factor per level and axis, e.g. ``((1, 2, 2), (2, 2, 2), ...)`` for a 3D model on voxels
            twice as long in Z as in-plane (see :func:`anisotropic_pool`); each level's upsampling undoes the same
            factor. None (default): 2 on every axis at every level.
        cue: ``"none"`` (default) or ``"distance"``: a second 1x1 head ``cues["cue_{j}"]`` on every top node
            X(0, j) that regresses each object's distance to its own border, divided by the object's largest such
            distance (1 at an object's centre, falling to 0 at its border and where it touches another object).
            The learned instance split floods it, times the mask's distance transform, from one seed per core (see
            :func:`napari_unetpp.inference.postprocess.split_instances`); deep supervision applies to it as to the
            classes,
            so every pruned level has its own cue.
    """

    in_channels: int = 1
    num_classes: int = 1
    features: tuple[int, ...] = (32, 64, 128, 256, 512)
    spatial_dims: int = 2
    norm: str = "none"
    dropout: float = 0.0
    upsample: str = "transpose"
    activation: str = "relu"
    groups: int = 8
    pool: tuple[tuple[int, ...], ...] | None = None
    cue: str = "none"

    def __post_init__(self) -> None:
        self.features = tuple(int(f) for f in self.features)
        if self.pool is not None:
            self.pool = tuple(tuple(int(f) for f in level) for level in self.pool)
            if len(self.pool) != len(self.features) - 1 or any(
                len(level) != self.spatial_dims or any(f not in (1, 2) for f in level) for level in self.pool
            ):
                raise ValueError(
                    f"pool needs {len(self.features) - 1} levels of {self.spatial_dims} factors, each 1 or 2; "
                    f"got {self.pool}."
                )
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}.")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}.")
        if len(self.features) < 2 or any(f < 1 for f in self.features):
            raise ValueError(f"features needs at least two positive entries (depth >= 1), got {self.features}.")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}.")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}.")
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {UPSAMPLES}, got {self.upsample!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.cue not in CUES:
            raise ValueError(f"cue must be one of {CUES}, got {self.cue!r}.")
        if self.cue != "none" and self.num_classes != 1:
            raise ValueError("an instance cue needs a 1-class (foreground) model.")

    @property
    def has_cue(self) -> bool:
        """Whether the heads come with an instance cue (``cue != "none"``)."""
        return self.cue != "none"

    @property
    def max_depth(self) -> int:
        """The deepest sub-network: ``len(features) - 1``."""
        return len(self.features) - 1

    @property
    def pool_factors(self) -> tuple[tuple[int, ...], ...]:
        """Pooling factor per level (1..max_depth) and spatial axis."""
        return self.pool if self.pool is not None else ((2,) * self.spatial_dims,) * self.max_depth

    @property
    def multiple(self) -> tuple[int, ...]:
        """What each spatial size must be a multiple of: the product of the pooling factors per axis
        (``2 ** max_depth`` everywhere for isotropic pooling)."""
        return tuple(int(math.prod(level[ax] for level in self.pool_factors)) for ax in range(self.spatial_dims))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``pool`` and ``cue`` only when they are not the defaults)."""
        d = asdict(self)
        d["features"] = list(self.features)
        if self.cue == "none":
            del d["cue"]
        if self.pool is None:
            del d["pool"]
        else:
            d["pool"] = [list(level) for level in self.pool]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetPlusPlusConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        return cls(**d)


def node_names(depth: int) -> list[str]:
    """Names of the nodes of the depth-``depth`` sub-network (``i + j <= depth``), in evaluation order."""
    names = []
    for d in range(depth + 1):
        # after encoder node X(d, 0), the anti-diagonal X(d-1, 1), ..., X(0, d) can be computed
        names += [f"x_{d - j}_{j}" for j in range(d + 1)]
    return names


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _pools(cfg: UNetPlusPlusConfig) -> nn.ModuleList:
    """Max pooling into each level 1..max_depth with that level's factors (identity where every factor is 1)."""
    pool = nn.MaxPool2d if cfg.spatial_dims == 2 else nn.MaxPool3d
    return nn.ModuleList([pool(f) if any(x > 1 for x in f) else nn.Identity() for f in cfg.pool_factors])


def anisotropic_pool(spacing: tuple[float, ...] | list[float], depth: int = 4) -> tuple[tuple[int, ...], ...]:
    """Pooling factors per level for voxels of ``spacing`` (nnU-Net's rule): an axis is pooled only while its
    voxels are less than twice as long as the finest axis's, and the spacing is tracked level by level, so a
    2 mm x 0.98 mm x 0.98 mm CT pools in-plane first and then everywhere.

    Args:
        spacing: Voxel size per spatial axis, in the array's order (e.g. Z, Y, X).
        depth: Levels below full resolution.
    """
    current = [float(s) for s in spacing]
    out = []
    for _ in range(depth):
        finest = min(current)
        level = tuple(2 if s < 2 * finest else 1 for s in current)
        current = [s * f for s, f in zip(current, level)]
        out.append(level)
    return tuple(out)


def _norm(cfg: UNetPlusPlusConfig, ch: int) -> nn.Module:
    if cfg.norm == "none":
        return nn.Identity()
    if cfg.norm == "batch":
        return (nn.BatchNorm2d if cfg.spatial_dims == 2 else nn.BatchNorm3d)(ch)
    if cfg.norm == "instance":
        return (nn.InstanceNorm2d if cfg.spatial_dims == 2 else nn.InstanceNorm3d)(ch, affine=True)
    return nn.GroupNorm(math.gcd(cfg.groups, ch), ch)


def _act(cfg: UNetPlusPlusConfig) -> nn.Module:
    return nn.ReLU(inplace=True) if cfg.activation == "relu" else nn.LeakyReLU(0.01, inplace=True)


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by normalisation, activation and dropout (the paper's unit)."""

    def __init__(self, cfg: UNetPlusPlusConfig, cin: int, cout: int) -> None:
        conv = _conv(cfg.spatial_dims)
        layers: list[nn.Module] = []
        for c_in in (cin, cout):
            layers += [conv(c_in, cout, 3, padding=1, bias=cfg.norm == "none"), _norm(cfg, cout), _act(cfg)]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
        super().__init__(*layers)
        self.unit = len(layers) // 2  # modules per convolution unit

    def forward(self, x: torch.Tensor, fp32_first: bool = False) -> torch.Tensor:
        """Apply the block; with ``fp32_first`` under autocast, the first convolution unit runs in fp32.

        The first convolution of the network sees raw intensities: in bf16 its rounding flipped 0.12 % of a trained
        EM model's mask pixels against fp32 (Dice 0.9988); keeping this one cheap convolution in fp32 brought the
        mask to Dice 0.9994 at no measurable cost at L4.
        """
        mods = list(self)
        dev = x.device.type
        if fp32_first and torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):  # convolution and normalisation in fp32 ...
                x = mods[1](mods[0](x.float()))
            x = x.to(torch.get_autocast_dtype(dev))  # ... activation after the cast: it commutes with rounding
            mods = mods[2:]
        for m in mods:
            x = m(x)
        return x


class Up(nn.Module):
    """Brings X(i+1, j-1) up to level i's resolution (undoing level i+1's pooling factors) and channels."""

    def __init__(self, cfg: UNetPlusPlusConfig, cin: int, cout: int, factor: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.mode = cfg.upsample
        self.factor: Any = 2 if factor is None or all(f == 2 for f in factor) else tuple(factor)
        if cfg.upsample == "transpose":
            tconv = nn.ConvTranspose2d if cfg.spatial_dims == 2 else nn.ConvTranspose3d
            self.proj: nn.Module = tconv(cin, cout, self.factor, stride=self.factor)
        else:
            self.proj = _conv(cfg.spatial_dims)(cin, cout, 1)
            linear = "bilinear" if cfg.spatial_dims == 2 else "trilinear"
            self.interp = "nearest" if cfg.upsample == "nearest" else linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "transpose":
            return self.proj(x)
        align = None if self.interp == "nearest" else False
        return self.proj(F.interpolate(x, scale_factor=self.factor, mode=self.interp, align_corners=align))


class Node(nn.Module):
    """Node X(i, j). Encoder nodes (j = 0) are a conv block; nested nodes also own the upsampling of X(i+1, j-1)."""

    def __init__(self, cfg: UNetPlusPlusConfig, i: int, j: int) -> None:
        super().__init__()
        f = cfg.features
        self.i, self.j = i, j
        if j == 0:
            self.up = None
            cin = cfg.in_channels if i == 0 else f[i - 1]
        else:
            self.up = Up(cfg, f[i + 1], f[i], cfg.pool_factors[i])
            cin = (j + 1) * f[i]
        self.conv = ConvBlock(cfg, cin, f[i])

    def forward(self, skips: list[torch.Tensor], below: torch.Tensor | None) -> torch.Tensor:
        """Encoder: ``skips`` is empty and ``below`` is the pooled input. Nested: X(i, 0..j-1) and X(i+1, j-1)."""
        if self.up is None:
            assert below is not None
            return self.conv(below, fp32_first=self.i == 0)
        return self.conv(torch.cat([*skips, self.up(below)], dim=1))


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
        self.pools = _pools(self.config)

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
        conv = _conv(cfg.spatial_dims)
        self.heads = nn.ModuleDict(
            {f"head_{j}": conv(cfg.features[0], cfg.num_classes, 1) for j in range(1, cfg.max_depth + 1)}
        )
        if cfg.has_cue:
            self.cues = nn.ModuleDict({f"cue_{j}": conv(cfg.features[0], 1, 1) for j in range(1, cfg.max_depth + 1)})
        _init_weights(self)

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
        self.pools = _pools(config)

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
        self.head = _conv(cfg.spatial_dims)(cfg.features[0], cfg.num_classes, 1)
        _init_weights(self)

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


def _init_weights(module: nn.Module) -> None:
    """He-normal initialisation (the paper's ``he_normal``), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())

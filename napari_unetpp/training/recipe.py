"""How to train, decided from the base model's own baseline on the user's validation pixels.

Three recipes (measured in ``benchmarks/bench_finetune.py``; the figures are in the README):

- ``gentle``: the base already does well (best trained level at least :data:`GOOD_BASELINE` Dice): small learning
  rate, batch-norm statistics frozen, full-size patches; adapts the base without wrecking it.
- ``adapt``: the base does not fit (a new modality): batch-norm statistics re-estimated on the user's images first
  (AdaBN: a few forward passes, no labels needed), then trained with them; a learning rate that moves, larger the
  worse the baseline; small patches for the first part of the budget (many cheap steps while the network moves
  a lot), full-size patches for the rest (context for the final state); no validation in the first quarter; and
  a last phase on every known pixel (:attr:`Recipe.refit_from`).
- ``scratch``: a fresh network (``new_model``): as ``adapt`` with a larger learning rate and nothing to re-estimate.

The last phase on every known pixel: a user who paints two slices has little data, and the validation split keeps a
fifth of it out of training. When the validation at :attr:`Recipe.refit_from` of the budget is still the best so far
(the network is still learning, not over-fitting), the validation pixels join the training pixels for the rest of
the run and the final state is kept; its card reports the scores of that last honest validation. When validation
has stopped improving, the run goes on as before and keeps its best validated state.

Each decision and its reason is recorded in the new model's card and printed by the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "GOOD_BASELINE",
    "RECIPES",
    "Recipe",
    "adapt_learning_rate",
    "choose_recipe",
    "patch_at",
    "reestimate_batchnorm",
]

RECIPES = ("auto", "gentle", "adapt", "scratch")
GOOD_BASELINE = 0.75  # best trained level's validation Dice from which the base is only adjusted
GENTLE_LR = 3e-4
ADAPT_LR = (1e-3, 2e-3)  # at a baseline Dice of GOOD_BASELINE .. POOR_BASELINE (log-linear between)
POOR_BASELINE = 0.5  # measured: 8e-4 lost 0.05 held-out Dice to 2e-3 from a 0.63 baseline (scratch-assay shift)
SCRATCH_LR = 2e-3
ADAPT_VS_FRESH = "adapting scored within 0.02 Dice of a fresh network or above it on five shifts; race=True races one"
REFIT_FROM = 0.5  # adapt and scratch: the full-patch half of the run also trains on the validation pixels


@dataclass(frozen=True)
class Recipe:
    """A training plan.

    Attributes:
        name: ``"gentle"``, ``"adapt"`` or ``"scratch"``.
        learning_rate: AdamW peak learning rate.
        freeze_batchnorm: Keep the base's batch-norm statistics fixed.
        reestimate_batchnorm: Re-estimate batch-norm statistics on the user's images before training.
        small_patch_until: Share of the training budget spent on small patches (0 = never).
        first_validation: Share of the training budget before the first validation after the baseline.
        reason: Why, in one sentence.
        refit_from: Share of the training budget after which the validation pixels also train, when validation is
            still improving there (0 = never).
    """

    name: str
    learning_rate: float
    freeze_batchnorm: bool
    reestimate_batchnorm: bool
    small_patch_until: float
    first_validation: float
    reason: str
    refit_from: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for people: the recipe, why, and what it sets (shown by the widget and the CLI)."""
        return (
            f"recipe {self.name}: {self.reason}; learning rate {self.learning_rate:.1e}, batch-norm statistics "
            f"{'frozen' if self.freeze_batchnorm else 'trained'}"
            + (", re-estimated on your images first" if self.reestimate_batchnorm else "")
        )


def adapt_learning_rate(best_baseline: float) -> float:
    """Peak learning rate for ``adapt``: log-linear from ``ADAPT_LR[0]`` at a baseline Dice of
    :data:`GOOD_BASELINE` to ``ADAPT_LR[1]`` at :data:`POOR_BASELINE` and below."""
    t = min(1.0, max(0.0, (GOOD_BASELINE - best_baseline) / (GOOD_BASELINE - POOR_BASELINE)))
    lo, hi = ADAPT_LR
    return float(math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo))))


def choose_recipe(
    baseline: dict[int, float],
    trained_levels: Iterable[int],
    *,
    fresh: bool = False,
    requested: str = "auto",
    learning_rate: float | None = None,
    freeze_batchnorm: bool | None = None,
    reestimate: bool | None = None,
) -> Recipe:
    """The recipe for this run from the base model's baseline validation Dice over the levels it will train.

    Args:
        baseline: Per-level validation Dice of the base model.
        trained_levels: Levels whose heads train (1..train_depth).
        fresh: The base was never trained (``new_model``): always ``scratch``.
        requested: ``"auto"`` decides; ``"gentle"``/``"adapt"``/``"scratch"`` force one.
        learning_rate, freeze_batchnorm, reestimate: The user's explicit choices, which override the recipe's
            (statistics are never re-estimated when they stay frozen).
    """
    if requested not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {requested!r}.")
    best = max((baseline[k] for k in trained_levels if k in baseline), default=0.0)  # none: nothing held out
    if fresh or requested == "scratch":
        name = "scratch"
        why = "a new network: trained from scratch" if fresh else "scratch recipe requested"
    elif requested != "auto":
        name, why = requested, f"{requested} recipe requested (base model's best level {best:.2f} Dice)"
    elif best >= GOOD_BASELINE:
        name = "gentle"
        why = f"the base model already does well here ({best:.2f} Dice >= {GOOD_BASELINE}): adjusted gently"
    else:
        name = "adapt"
        why = (
            f"the base model does not fit these images ({best:.2f} Dice < {GOOD_BASELINE}): adapted, not replaced by "
            f"a fresh network (measured: {ADAPT_VS_FRESH})"
        )
    if name == "gentle":
        lr, freeze, reest, small, first = GENTLE_LR, True, False, 0.0, 0.0
    elif name == "adapt":
        lr, freeze, reest, small, first = adapt_learning_rate(best), False, True, 0.5, 0.25
    else:
        lr, freeze, reest, small, first = SCRATCH_LR, False, False, 0.5, 0.25
    if learning_rate is not None:
        lr = float(learning_rate)
    if freeze_batchnorm is not None:
        freeze = bool(freeze_batchnorm)
    if reestimate is not None:
        reest = bool(reestimate)
    reest = reest and not freeze
    refit = 0.0 if name == "gentle" else REFIT_FROM
    return Recipe(name, lr, freeze, reest, small, first, why, refit)


def patch_at(fraction: float, full: Sequence[int], small: Sequence[int], small_until: float) -> tuple[int, ...]:
    """The patch shape at this share of the budget: ``small`` before ``small_until``, ``full`` after."""
    return tuple(small) if fraction < small_until else tuple(full)


@torch.no_grad()
def reestimate_batchnorm(module: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every batch norm's running statistics by their average over ``batches`` (AdaBN): forward passes in
    training mode, cumulative averaging, no gradients, weights untouched. Returns the number of batches used."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = [(m, m.momentum, m.training) for m in norms]
    was_training = module.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    module.train()
    n = 0
    try:
        for x in batches:
            module(x)
            n += 1
    finally:
        module.train(was_training)
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    return n

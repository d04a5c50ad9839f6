"""When the training engine does what: the schedule it asks at every step.

The engine (:class:`~napari_unetpp.training.engine.Trainer`) never reads a budget itself. Before each optimiser step
it asks its schedule :meth:`Schedule.now` (the learning rate, whether patches are small, whether the refit point is
reached), after it :meth:`Schedule.validation_due` and :meth:`Schedule.done`; it tells the schedule how long a step
and a validation took (:attr:`Schedule.step_seconds`, :attr:`Schedule.val_seconds`). Two schedules:

- :class:`BudgetSchedule` (batch fine-tuning): the user's wall-clock minutes and/or epochs. The learning rate, the
  small-patch phase, the refit point and the first validation are shares of that budget, and training ends early
  enough for the final validation and the save.
- :class:`OpenSchedule` (a run without a budget, e.g. training while the user paints): never done, a constant
  (or halving) learning rate after the warm-up, full-size patches, no refit, a validation every
  ``validate_every_s`` seconds (or less often, so that validations take at most :attr:`OpenSchedule.VAL_SHARE` of
  the time).

Both read one clock (default :func:`time.perf_counter`); tests pass another, so a timed test does not depend on the
machine's speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from napari_unetpp.training.recipe import Recipe
from napari_unetpp.training.steps import learning_rate

__all__ = ["BudgetSchedule", "Moment", "OpenSchedule", "Schedule"]


@dataclass(frozen=True)
class Moment:
    """What the schedule says before one optimiser step.

    Attributes:
        fraction: Share of the budget used (0..1; 0 for an open-ended schedule), for progress bars.
        learning_rate: The step's learning rate.
        small_patches: Train on the small patches (the early, cheap phase) rather than the full ones.
        refit: The point is reached where the validation pixels may join training (the engine decides whether).
    """

    fraction: float
    learning_rate: float
    small_patches: bool
    refit: bool


class Schedule:
    """What every schedule holds: the clock, the plan set after the baseline, and the measured durations.

    Attributes:
        clock: Seconds counter (default :func:`time.perf_counter`).
        t0: The clock when the run started (the schedule's creation).
        recipe: The plan (:meth:`plan`); None before the baseline.
        steps_per_epoch: Steps between validations (default 10 until :meth:`plan`).
        fixed_epochs: The user set ``steps_per_epoch``: validate exactly every that many steps.
        refit_from: Share of the budget from which the validation pixels may train (0 = never).
        warmup_steps: Linear warm-up steps of the learning rate.
        step_seconds: Duration of the last optimiser step (set by the engine).
        val_seconds: Duration of the last validation (set by the engine).
    """

    SAVE_SECONDS = 1.0  # writing weights and card (measured: 0.1-0.3 s for the shipped size), with room

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.t0 = clock()
        self.recipe: Recipe | None = None
        self.steps_per_epoch = 10
        self.fixed_epochs = False
        self.refit_from = 0.0
        self.warmup_steps = 5
        self.step_seconds = 0.0
        self.val_seconds = 0.0

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return self.clock() - self.t0

    def plan(
        self,
        recipe: Recipe,
        steps_per_epoch: int,
        *,
        fixed_epochs: bool = False,
        refit_from: float = 0.0,
        warmup_steps: int = 5,
    ) -> None:
        """Set what the baseline decided: the recipe, steps per epoch, the refit point and the warm-up."""
        self.recipe, self.steps_per_epoch, self.fixed_epochs = recipe, int(steps_per_epoch), bool(fixed_epochs)
        self.refit_from, self.warmup_steps = float(refit_from), int(warmup_steps)

    def fraction(self, step: int) -> float:
        """Share of the budget used after ``step`` steps (0..1)."""
        raise NotImplementedError

    def done(self, step: int) -> bool:
        """No budget left for another step."""
        raise NotImplementedError

    def now(self, step: int) -> Moment:
        """The learning rate, patch size and refit point for the next step (needs :meth:`plan`)."""
        raise NotImplementedError

    def validation_due(self, step: int, last_step: int, last_time: float) -> bool:
        """Whether to validate after ``step`` steps, the last validation having been after ``last_step`` steps at
        ``last_time`` seconds."""
        raise NotImplementedError

    def _recipe(self) -> Recipe:
        if self.recipe is None:
            raise RuntimeError("the schedule has no plan yet: call plan() after the baseline.")
        return self.recipe


class BudgetSchedule(Schedule):
    """The budget: wall-clock minutes (validation and saving included) and/or epochs.

    Training ends when the time left no longer holds another step plus the final validation and the save, so the
    whole run, from preparing the data to the saved card, ends within the budget. The learning rate decays with the
    share of the budget used (:func:`~napari_unetpp.training.steps.learning_rate`); the recipe's small-patch phase,
    refit point and first validation are shares of it too.

    Args:
        minutes: Wall-clock budget (None: epochs only).
        epochs: Epoch budget (None: minutes only); an epoch is :attr:`steps_per_epoch` steps.
        clock: Seconds counter (default :func:`time.perf_counter`).
    """

    def __init__(
        self, minutes: float | None, epochs: int | None, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        super().__init__(clock)
        self.budget_s = None if minutes is None else minutes * 60.0
        self.epochs = epochs

    def _train_budget(self) -> float:
        assert self.budget_s is not None
        return max(1e-6, self.budget_s - 1.2 * self.val_seconds - self.SAVE_SECONDS)

    def fraction(self, step: int) -> float:
        """Share of the training budget used (0..1), for schedules and progress bars."""
        fr = []
        if self.budget_s is not None:
            fr.append(self.elapsed() / self._train_budget())
        if self.epochs is not None:
            fr.append(step / (self.epochs * self.steps_per_epoch))
        return float(min(1.0, max(fr)))

    def done(self, step: int) -> bool:
        """No time (or epoch) left for another step."""
        if self.epochs is not None and step >= self.epochs * self.steps_per_epoch:
            return True
        return self.budget_s is not None and self.elapsed() + 0.5 * self.step_seconds >= self._train_budget()

    def now(self, step: int) -> Moment:
        """Warm-up then cosine decay over the budget; small patches before the recipe's ``small_patch_until``; the
        refit point at ``refit_from`` of the budget (never at step 0)."""
        recipe = self._recipe()
        frac = self.fraction(step)
        return Moment(
            frac,
            learning_rate(step, frac, recipe.learning_rate, self.warmup_steps),
            frac < recipe.small_patch_until,
            bool(self.refit_from) and step > 0 and frac >= self.refit_from,
        )

    def validation_due(self, step: int, last_step: int, last_time: float) -> bool:
        """Every :attr:`steps_per_epoch` steps; when the user did not set them and the recipe is not ``gentle``,
        also not before the recipe's ``first_validation`` share of the budget nor within a tenth of the budget of
        the last one (fewer validations while the network moves fast)."""
        recipe = self._recipe()
        due = step - last_step >= self.steps_per_epoch
        if not self.fixed_epochs and recipe.name != "gentle":
            due = due and self.fraction(step) >= recipe.first_validation
            if self.budget_s is not None:
                due = due and self.elapsed() - last_time >= 0.1 * self.budget_s
        return due


class OpenSchedule(Schedule):
    """No budget: the driver decides when to stop (e.g. when the user stops painting).

    Never done, fraction 0, the recipe's learning rate after the warm-up (halved every ``half_life_s`` seconds down
    to :attr:`FLOOR` of it, or constant), full-size patches, no refit (the validation pixels stay held out), and a
    validation every ``validate_every_s`` seconds or less often (at most :attr:`VAL_SHARE` of the time).

    Args:
        validate_every_s: Seconds between validations (default 10).
        clock: Seconds counter (default :func:`time.perf_counter`).
        half_life_s: Seconds in which the learning rate halves (None: constant).
    """

    VAL_SHARE = 0.2  # the most of the time validations may take
    FLOOR = 0.1  # the lowest share of the peak learning rate a half-life brings it to

    def __init__(
        self,
        validate_every_s: float = 10.0,
        clock: Callable[[], float] = time.perf_counter,
        half_life_s: float | None = None,
    ) -> None:
        super().__init__(clock)
        if half_life_s is not None and not half_life_s > 0:
            raise ValueError(f"half_life_s must be positive (or None for a constant rate), got {half_life_s}.")
        self.validate_every_s = float(validate_every_s)
        self.half_life_s = half_life_s

    def fraction(self, step: int) -> float:
        return 0.0

    def done(self, step: int) -> bool:
        return False

    def now(self, step: int) -> Moment:
        lr = learning_rate(step, 0.0, self._recipe().learning_rate, self.warmup_steps)
        if self.half_life_s:
            lr *= max(self.FLOOR, 0.5 ** (self.elapsed() / self.half_life_s))
        return Moment(0.0, lr, False, False)

    def validation_due(self, step: int, last_step: int, last_time: float) -> bool:
        """After ``validate_every_s`` seconds, and no sooner than keeps validation under :attr:`VAL_SHARE` of the
        time (on a large plane one validation can take longer than several steps)."""
        wait = max(self.validate_every_s, self.val_seconds / self.VAL_SHARE)
        return step > last_step and self.elapsed() - last_time >= wait

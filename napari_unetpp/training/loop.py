"""Fine-tuning as a job: a generator that yields progress and returns the saved model version, driving the engine.

    for progress in fine_tune_iter("em-membranes", TrainingPair(image, labels, slices=[3, 7]), minutes=2): ...
    result = fine_tune(...)             # the same, run to the end

Patches centred on known training pixels (see :mod:`.augment`). How to train is decided from the base model's own
baseline on the validation pixels (see :mod:`.recipe`): ``gentle`` (small learning rate, frozen batch-norm
statistics) when the base already does well, ``adapt`` (batch-norm statistics re-estimated on the user's images and
trained, a learning rate that moves, small patches first, fewer validations early) when it does not, ``scratch`` for
a fresh network from :func:`~napari_unetpp.model.modalities.new_model`; adapt and scratch train on the validation pixels
too for the second half of the run when validation is still improving at that point (the final state is kept, the
card reports the last honest validation). AdamW with warm-up and cosine decay; deep supervision with the hybrid loss
over every head up to the trained depth. Mixed precision on CUDA (bf16 where the GPU has it, batches made ahead by a
background thread), bf16 on CPUs that support it. The budget is the user's wall clock: data preparation, validation
and saving count, and training stops early enough for the final validation and the save. The base model's validation
score is measured first and counts as a candidate, so the saved version is never worse on validation than its parent
(after the last phase: at its last honest validation). Stopping (the ``stop`` event) validates and saves the best
state so far; closing the generator cancels and saves nothing. Where the depth flows: ``train_depth=k`` trains the
sub-network of depth k (heads 1..k, nodes i + j <= k); validation scores every level, the best state and the
recommended depth (the shallowest within :data:`~napari_unetpp.training.metrics.RECOMMEND_MARGIN` of the best) are
chosen on the trained levels only.

The state and the steps are the engine's (:class:`~napari_unetpp.training.engine.Trainer`, phases prepare, baseline,
train, refit, finalize); this module runs its phases in order under a
:class:`~napari_unetpp.training.schedule.BudgetSchedule`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

import torch

from napari_unetpp.jobs import run_to_end
from napari_unetpp.model.card import check_model_name
from napari_unetpp.model.registry import resolve_model
from napari_unetpp.training.config import FineTuneConfig, TrainProgress, make_config
from napari_unetpp.training.data import TrainingPair
from napari_unetpp.training.engine import Trainer
from napari_unetpp.training.race import race, races
from napari_unetpp.training.saving import FineTuneResult, check_class_names, default_name
from napari_unetpp.training.schedule import BudgetSchedule

__all__ = ["FineTuneConfig", "FineTuneResult", "TrainProgress", "default_name", "fine_tune", "fine_tune_iter"]


def fine_tune_iter(
    model: Any,
    data: TrainingPair | Sequence[TrainingPair],
    *,
    config: FineTuneConfig | None = None,
    device: str | torch.device = "auto",
    name: str | None = None,
    save: bool = True,
    stop: threading.Event | Callable[[], bool] | None = None,
    classes: Sequence[str] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    **options: Any,
) -> Generator[TrainProgress, None, FineTuneResult]:
    """Fine-tune ``model`` on corrected labels; yield :class:`TrainProgress`, return :class:`FineTuneResult`.

    Args:
        model: Base model (name, ``name@vN``, path, :class:`LoadedModel` or ``UNetPlusPlus``), or a fresh network
            from :func:`~napari_unetpp.model.modalities.new_model`; never modified.
        data: One or more :class:`TrainingPair`.
        config: Hyperparameters; keywords in ``options`` override its fields (e.g. ``minutes=2``).
        device: ``"auto"`` (CUDA, MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.
        name: Name to save under (default: the base's name for user models, ``<base>-finetuned`` for shipped ones).
        save: Save the best state as a new model version (never overwrites anything).
        stop: An event (or callable) that ends training at the next step; the best state so far is validated, kept
            and saved. Closing the generator instead cancels the run: nothing is saved.
        classes: Class names for the new version's card (default: the base's), e.g. ``["nucleus"]`` when an EM
            membrane model is fine-tuned on nuclei.
        clock: The seconds counter the wall-clock budget reads (default :func:`time.perf_counter`; tests pass their
            own, so a timed run does not depend on the machine's speed).

    Raises:
        TrainingDataError, InputError: unusable data (one sentence saying what to do).
        MemoryError: out of memory even at batch 1 with the smallest patch.
    """
    cfg = make_config(config, options)
    if name is not None:
        check_model_name(name)  # before any work: a name the save would refuse must not cost the run
    base = resolve_model(model)
    class_names = check_class_names(classes, base)
    schedule = BudgetSchedule(cfg.minutes, cfg.epochs, clock=clock)  # the budget counts from here
    trainer = Trainer(base, data, cfg, schedule, device=device, stop=stop)
    try:
        yield from trainer.prepare()
        yield from trainer.baseline()
        if races(trainer, data):  # the base does not fit: does adapting it pay? a fresh network races it
            trainer = yield from race(trainer, data)
        while trainer.phase in ("train", "refit"):
            yield from trainer.step()
    finally:  # also when the caller closes the generator: that cancels the run, and nothing is saved
        trainer.release()
    name = name or default_name(base)  # also when a fresh network won the race: the user's base names the result
    return (yield from trainer.finalize(name=name, save=save, classes=class_names))


def fine_tune(
    model: Any,
    data: TrainingPair | Sequence[TrainingPair],
    *,
    on_progress: Callable[[TrainProgress], None] | None = None,
    **kwargs: Any,
) -> FineTuneResult:
    """Run :func:`fine_tune_iter` to the end (same arguments) and return its result; ``on_progress`` gets each
    :class:`TrainProgress`."""
    return run_to_end(fine_tune_iter(model, data, **kwargs), on_progress)

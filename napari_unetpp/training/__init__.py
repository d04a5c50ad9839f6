"""Fine-tuning on the user's corrections: a generator that yields progress and returns the saved model version.

    gen = fine_tune_iter("em-membranes", TrainingPair(image, labels, slices=[3, 7]), minutes=2)
    for progress in gen: ...            # or: result = fine_tune(...)

The package, in reading order: :mod:`.known` (which pixels are ground truth, the validation split), :mod:`.data`
(the pairs and their normalised items), :mod:`.augment` (patch sampling and augmentation), :mod:`.source` (the data
the steps sample, replaceable between steps), :mod:`.validation` (per-level Dice), :mod:`.recipe` (how to train,
decided from the base model's baseline), :mod:`.config` (hyperparameters and progress), :mod:`.schedule` (when to do
what: a budget, or none), :mod:`.setup` and :mod:`.optimiser` (the network trained and its optimiser), :mod:`.steps`
(the small parts of a step), :mod:`.engine` (the steppable trainer and its phases), :mod:`.saving` (the new
version's card) and :mod:`.loop` (``fine_tune_iter``: the engine driven under a budget).

Which pixels are ground truth
    Only *known* pixels enter the loss; everything else is ignored, never treated as background. Known pixels are,
    in order of precedence: an explicit ``known`` mask; the listed ``slices`` (indices over the labels' leading,
    non-YX axes, e.g. z for a ZYX stack); ``"all"``; or by default every slice holding at least one non-zero label.
    Pixels equal to ``ignore_label`` are unknown in every case.

Validation
    Known pixels are cut into blocks (about a quarter of each axis, 16-128 px). A block goes to validation when a hash
    of (pair, slice, block position) falls under ``val_fraction``: the split depends on nothing else, so the same
    pixels stay in validation when the user corrects more slices and fine-tunes again (no leakage across rounds).
    Validation runs the module being trained through predict's tiles (the tiles holding validation pixels,
    blended as predict blends them) and scores only validation pixels.

Training
    Patches centred on known training pixels, preferring pixels the user changed (``focus``) and foreground; flips,
    90-degree rotations (half-turns on non-square patches), intensity jitter and a mild random affine. The recipe is
    decided from the base model's baseline (:mod:`.recipe`): ``gentle`` when it already does well, ``adapt`` (batch
    norm statistics re-estimated and trained, a learning rate that moves, small patches first) when it does not,
    ``scratch`` for a fresh network (:func:`napari_unetpp.model.modalities.new_model`); adapt and scratch end with a
    phase
    that also trains on the validation pixels while validation still improves. AdamW with warm-up and cosine decay;
    deep supervision with the hybrid loss over every head up to the trained depth. Mixed precision on CUDA, bf16 on
    CPUs that support it. The wall-clock budget includes validation and saving. The base model's validation score is
    measured first and counts as a candidate, so the saved version is never worse on validation than its parent.
    Stopping with the ``stop`` event saves the best state seen so far; closing the generator cancels.
"""

from __future__ import annotations

from napari_unetpp.training.augment import augment_batch, random_affine, sample_batch
from napari_unetpp.training.config import FineTuneConfig, TrainProgress
from napari_unetpp.training.data import (
    TrainingDataError,
    TrainingItem,
    TrainingPair,
    TrainingSet,
    pad_item,
    parse_slices,
    prepare_data,
)
from napari_unetpp.training.engine import PHASES, Trainer
from napari_unetpp.training.loop import FineTuneResult, default_name, fine_tune, fine_tune_iter
from napari_unetpp.training.metrics import dice_score, recommend_depth
from napari_unetpp.training.recipe import Recipe, choose_recipe, reestimate_batchnorm
from napari_unetpp.training.schedule import BudgetSchedule, OpenSchedule, Schedule
from napari_unetpp.training.steps import (
    batch_and_patch,
    freeze_batchnorms,
    learning_rate,
    shrink_after_oom,
    train_step,
    trained_batchnorms,
)
from napari_unetpp.training.validation import validate

__all__ = [
    "PHASES",
    "BudgetSchedule",
    "FineTuneConfig",
    "FineTuneResult",
    "OpenSchedule",
    "Recipe",
    "Schedule",
    "TrainProgress",
    "Trainer",
    "TrainingDataError",
    "TrainingItem",
    "TrainingPair",
    "TrainingSet",
    "augment_batch",
    "batch_and_patch",
    "choose_recipe",
    "default_name",
    "dice_score",
    "fine_tune",
    "fine_tune_iter",
    "freeze_batchnorms",
    "learning_rate",
    "pad_item",
    "parse_slices",
    "prepare_data",
    "random_affine",
    "recommend_depth",
    "reestimate_batchnorm",
    "sample_batch",
    "shrink_after_oom",
    "train_step",
    "trained_batchnorms",
    "validate",
]

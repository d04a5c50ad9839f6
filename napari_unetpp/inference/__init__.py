"""From an image to probabilities, masks and objects, through one sliding-window path.

- ``plan``: what a run will do (:func:`~napari_unetpp.inference.plan.plan_prediction`); ``tiling``: tile grids,
  Gaussian blending, lazy tile reads;
- ``sliding_window``: the one loop, and the :class:`~napari_unetpp.inference.sliding_window.Predictor` and
  :class:`~napari_unetpp.inference.sliding_window.Sink` protocols it runs; ``predictor``: what prediction wraps
  around a runtime, and the network being trained as a predictor;
- ``writer``: the sink that fills a :class:`~napari_unetpp.inference.result.Prediction` (``result``);
- ``zoom``: resample in, run, resample out; ``predict``: ``predict_iter`` / ``predict``;
- ``masks``, ``postprocess``: the mask rule, objects and level disagreement.

Validation during fine-tuning (:mod:`napari_unetpp.training.validation`) runs the same loop with a sink that counts.
"""

"""Tiny registered networks for the widgets' wiring tests: the widgets must do what the core does, which a network of
a few thousand weights shows as well as the shipped ones, in a fraction of the time. Results that need a trained
network (a good Dice on a sample, the learned object split) keep the shipped models."""

from __future__ import annotations

import torch

from napari_unetpp.model.card import ModelCard
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.model.registry import load_model, save_model

TINY_EM = "tiny-em@v1"


def register_tiny_em(name: str = "tiny-em", seed: int = 0) -> str:
    """Save a tiny untrained 4-level UNet++ with the shipped EM model's normalisation and pixel size into the test's
    own models folder (conftest isolates it); returns its id (``tiny-em@v1``).

    Its heads are scaled (x4, bias 0.5) so the probabilities spread over 0..1 with few near 0.5: masks have
    foreground, background and many objects, the levels disagree, and a threshold of 0.9 keeps less than 0.5.
    """
    em = load_model("em-membranes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = UNetPlusPlus(features=(4, 4, 8, 8, 8), norm="group")
    with torch.no_grad():
        for head in net.heads.values():
            head.weight.mul_(4.0)
            head.bias.fill_(0.5)
    net.eval()
    card = ModelCard(
        name=name,
        architecture=net.config.to_dict(),
        normalization=dict(em.card.normalization),
        classes=list(em.card.classes),
        description="tiny untrained test network",
        training={k: v for k, v in em.card.training.items() if k in ("spacing", "spacing_unit")},
        recommended_depth=em.card.recommended_depth,  # (so the slider starts where the shipped model's does)
    )
    save_model(net, card)
    return f"{name}@v1"

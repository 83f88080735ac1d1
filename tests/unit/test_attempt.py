"""training/run/attempt.py: the evaluation before training leaves the random generators as they were, so the
training that follows draws what a script that never evaluated first draws (the same dropout masks)."""

import random

import numpy as np
import torch

from training.run.attempt import rng_kept


def draws():
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def seed(n):
    torch.manual_seed(n)
    random.seed(n)
    np.random.seed(n)


def test_what_is_drawn_inside_is_not_drawn_from_what_follows():
    seed(7)
    plain = draws()
    seed(7)
    with rng_kept():
        torch.rand(1000)  # what an evaluation's DataLoader and anything else would draw
        random.random()
        np.random.rand(9)
        loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, shuffle=True)
        list(loader)
    assert draws() == plain
    seed(7)
    torch.rand(1000)
    assert draws() != plain  # without it, they would differ

"""train.mixed_precision reaches the forward passes: the trainer does not hand the model to
accelerate, so it must enter accelerate's autocast itself around rollouts, plan and loss."""

import math

import pytest
import torch

import ogls_sd.trainer as trainer_mod
from ogls_sd.trainer import train


@pytest.mark.parametrize("mp, expect", [("no", False), ("bf16", True)])
def test_autocast_follows_mixed_precision(tiny_cfg, monkeypatch, mp, expect):
    seen: dict[str, list[bool]] = {"plan": [], "loss": []}
    real_build = trainer_mod.build_algorithm

    def build(*a, **k):
        algo = real_build(*a, **k)
        plan, loss = algo.plan, algo.loss

        def rec_plan(*x, **y):
            seen["plan"].append(torch.is_autocast_enabled("cpu"))
            return plan(*x, **y)

        def rec_loss(*x, **y):
            seen["loss"].append(torch.is_autocast_enabled("cpu"))
            out = loss(*x, **y)
            return out

        algo.plan, algo.loss = rec_plan, rec_loss
        return algo

    monkeypatch.setattr(trainer_mod, "build_algorithm", build)
    summary = train(tiny_cfg("train.algorithm=opsd", "train.device=cpu", f"train.mixed_precision={mp}", "train.steps=2"))
    assert seen["plan"] and seen["loss"]
    assert set(seen["plan"]) == {expect} and set(seen["loss"]) == {expect}
    assert math.isfinite(summary["accuracy_after"])

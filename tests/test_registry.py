"""The algorithm registry: one module registers an algorithm, and config validation, the CLI help,
teacher resolution, the trainer's no-op hint and ``compare`` all read it (issue 21)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ogls_sd import compare
from ogls_sd.algorithms import algorithm_spec, build_algorithm, compare_methods, needs_teacher, register_algorithm, teacher_kind
from ogls_sd.algorithms.base import Algorithm
from ogls_sd.config import Config, ConfigError, _Section, describe_fields, opt
from ogls_sd.registry import ALGORITHMS, SECTIONS, Registry
from ogls_sd.trainer import noop_cause


@dataclass
class ToyConfig(_Section):
    _section = "toy"
    _positive = ("scale",)
    scale: float = opt(1.0, "How much of nothing the toy algorithm does.")


class Toy(Algorithm):
    def __init__(self, scale: float):
        self.scale = scale


@pytest.fixture
def toy(monkeypatch):
    """Register a toy algorithm for one test (the registries are restored afterwards)."""
    monkeypatch.setattr(ALGORITHMS, "_items", dict(ALGORITHMS._items))
    monkeypatch.setattr(SECTIONS, "_items", dict(SECTIONS._items))

    @register_algorithm("toy", "a toy", config_section=ToyConfig, needs_teacher=lambda cfg: cfg.toy.scale > 1,
                        needs_siblings=True, default_teacher="ema", noop_hint="turn the toy's knob",
                        methods={"toy": ([], "the toy", True), "toy_big": (["toy.scale=3"], "a bigger toy")})
    def build_toy(cfg, policy, teacher, prompts):
        return Toy(cfg.toy.scale)

    return build_toy


def test_a_registered_algorithm_is_known_everywhere(toy):
    cfg = Config.load(None, ["train.algorithm=toy", "toy.scale=2"])
    assert cfg.toy.scale == 2.0 and cfg.to_dict()["toy"] == {"scale": 2.0}
    assert Config.from_dict(cfg.to_dict()).toy.scale == 2.0  # round trip through config.yaml
    assert algorithm_spec(cfg).name == "toy" and needs_teacher(cfg)
    assert cfg.teacher.resolve("toy") == "ema" and teacher_kind(cfg) == "ema"
    assert not needs_teacher(Config.load(None, ["train.algorithm=toy"])) and teacher_kind(
        Config.load(None, ["train.algorithm=toy"])) == "live"
    algo = build_algorithm(cfg, None, None, None)
    assert isinstance(algo, Toy) and algo.scale == 2.0 and algo.name == "toy"
    keys = {k for k, _, _ in describe_fields()}
    assert "toy.scale" in keys and any("toy" in h for k, _, h in describe_fields() if k == "train.algorithm")
    methods = compare_methods()
    assert methods["toy_big"].algorithm == "toy" and methods["toy_big"].overrides == ("toy.scale=3",)
    assert methods["toy"].default and not methods["toy_big"].default
    assert "turn the toy's knob" in noop_cause(cfg, {})


def test_registered_rules_are_enforced(toy):
    with pytest.raises(ConfigError, match="rollout.num_generations: must be >= 2 with train.algorithm=toy"):
        Config.load(None, ["train.algorithm=toy", "rollout.num_generations=1"])
    with pytest.raises(ConfigError, match=r"toy.scale: must be > 0"):
        Config.load(None, ["train.algorithm=toy", "toy.scale=0"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) toy.size"):
        Config.load(None, ["toy.size=1"])
    with pytest.raises(ValueError, match="registered twice"):
        register_algorithm("toy", "again")(lambda *a: None)


def test_unknown_algorithm_names_the_key_and_the_closest_name():
    with pytest.raises(ConfigError, match=r"train.algorithm: 'ogls' is not one of .*ogls_sd.*\(did you mean ogls_sd\?\)"):
        Config.load(None, ["train.algorithm=ogls"])
    with pytest.raises(ConfigError, match=r"unknown section\(s\) toy"):
        Config.load(None, ["toy.scale=1"])  # not registered here: an unknown section, as before


def test_every_builtin_algorithm_and_method_is_registered():
    assert {"ogls_sd", "opsd", "sft", "rft", "grpo", "opsd_grpo"} <= set(ALGORITHMS)
    assert set(compare.DEFAULT_METHODS) <= set(compare.METHODS)
    for m, (algo, overrides, _) in compare.METHODS.items():
        assert algo in ALGORITHMS
        Config.load(None, [f"train.algorithm={algo}", *overrides])  # every method's overrides are valid


def test_registry_lookup_error_lists_names():
    reg: Registry = Registry("thing")
    reg.register("alpha", 1)
    assert reg["alpha"] == 1 and "alpha" in reg and list(reg) == ["alpha"] and 3 not in reg
    with pytest.raises(KeyError, match=r"thing: 'alpah' is not one of alpha \(did you mean alpha\?\)"):
        reg["alpah"]
    with pytest.raises(ValueError, match="identifier"):
        reg.register("not a name", 2)

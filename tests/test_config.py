import pytest
import yaml

from ogls_sd.config import Config, ConfigError, describe_fields


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = Config()
    p = tmp_path / "c.yaml"
    cfg.save(p)
    again = Config.load(p)
    assert again == cfg
    assert again.hash() == cfg.hash()


def test_overrides_are_typed_and_applied(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"loss": {"clip": "entry"}, "train": {"steps": 7}}))
    cfg = Config.load(p, ["steering.strength=0.75", "train.steps=9", "model.lora_target_modules=q_proj,v_proj"])
    assert cfg.loss.clip == "entry"
    assert cfg.train.steps == 9
    assert cfg.steering.strength == 0.75
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]


def test_yaml_booleans_are_accepted_for_no_yes_choices(tmp_path):
    # YAML 1.1 reads `no` as false: train.mixed_precision=no must still mean "no"
    assert Config.load(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  mixed_precision: no\n")
    assert Config.load(p).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"templates\.system"):
        Config.load(None, ["templates.system=true"])  # a free string field: still an error, not "yes"


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads "1e-5" as a string; both the CLI and config files must still accept it
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 3e-6\n")
    assert Config.load(p).train.lr == 3e-6
    assert Config.load(None, ["train.lr=1e-5"]).train.lr == 1e-5


@pytest.mark.parametrize("override, key", [
    (["loss.clip=sometimes"], "loss.clip"),
    (["train.steps=0"], "train.steps"),
    (["train.steps=abc"], "train.steps"),
    (["train.lr=fast"], "train.lr"),
    (["teacher.ema_decay=1.5"], "teacher.ema_decay"),
    (["teacher.ema_decay=fast"], "teacher.ema_decay"),
    (["teacher.ema_decay=-0.1"], "teacher.ema_decay"),
    (["loss.nonexistent=1"], "loss.nonexistent"),
    (["nosection.x=1"], "nosection"),
    (["model.lora=maybe"], "model.lora"),
    (["warmstart.student_fraction=0.8", "warmstart.reference_fraction=0.5"], "warmstart.student_fraction"),
    (["steering.negative_branch=mean_prob"], "steering.negative_branch"),
    (["steering.negative_branch=log_mean", "steering.pooling=global"], "steering.negative_branch"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config.load(None, override)


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: 3\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*line"):
        Config.load(p)


def test_every_field_has_help():
    rows = describe_fields()
    assert len(rows) > 50
    for key, _default, h in rows:
        assert h.strip(), f"{key} has no help text"


def test_negative_branch_choices_are_the_loss_modules():
    """The config's allowed values are the ones the pooling kernel implements."""
    import dataclasses

    from ogls_sd.config import SteeringConfig
    from ogls_sd.losses.target import NEGATIVE_BRANCHES

    f = {f.name: f for f in dataclasses.fields(SteeringConfig)}["negative_branch"]
    assert f.metadata["choices"] == ("auto", *NEGATIVE_BRANCHES)
    assert Config().steering.resolve_negative_branch() == "log_mean"  # auto: RLCSD's marginalisation under context pooling
    assert Config.load(None, ["steering.pooling=global"]).steering.resolve_negative_branch() == "mean_log"  # no contexts: inert
    assert Config.load(None, ["steering.negative_branch=log_mean"]).steering.negative_branch == "log_mean"
    assert Config.load(None, ["train.algorithm=opsd", "steering.negative_branch=log_mean"]).steering.negative_branch == "log_mean"


@pytest.mark.parametrize("overrides,message", [
    (["loss.clip=safe", "loss.clip_tau=0"], "loss.clip=safe needs clip_tau > 0"),
    (["loss.clip=entry", "loss.divergence=jsd"], "loss.clip=entry clamps forward-KL summands"),
])
def test_loss_options_are_checked_when_the_config_loads(overrides, message):
    """The loss module's own rules (DivergenceSpec) run at config load, before any model loads."""
    with pytest.raises(ConfigError, match=message):
        Config.load(None, overrides)


def test_a_mistyped_key_or_section_gets_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train.lrr \(did you mean train.lr\?\)"):
        Config.load(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown section\(s\) trian; .*\(did you mean train\?\)"):
        Config.load(None, ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train.zzzz$"):  # nothing close: no guess
        Config.load(None, ["train.zzzz=1"])


def test_ema_decay_auto_resolves_to_the_algorithms_default():
    cfg = Config()
    assert cfg.teacher.ema_decay == "auto"
    assert cfg.teacher.resolve_ema_decay("sdpo") == 0.95  # TRL's teacher_update_rate 0.05
    assert cfg.teacher.resolve_ema_decay("ogls_sd") == cfg.teacher.resolve_ema_decay("opsd") == 0.999
    for given in ("teacher.ema_decay=0.5", "teacher.ema_decay=5e-1"):  # a number always wins, also from YAML strings
        c = Config.load(None, [given])
        assert c.teacher.ema_decay == 0.5 and c.teacher.resolve_ema_decay("sdpo") == 0.5
    cfg.teacher.ema_decay = "auto"  # an assignment is checked like an override
    with pytest.raises(ConfigError, match=r"teacher\.ema_decay: expected a number in \[0, 1\] or auto"):
        cfg.teacher.ema_decay = "slow"
    assert cfg.teacher.ema_decay == "auto"


def test_sdpo_alone_gets_trls_ema_rate():
    """train.algorithm=sdpo without teacher settings builds TRL's default teacher: EMA, decay 0.95."""
    from ogls_sd.algorithms import teacher_kind

    cfg = Config.load(None, ["train.algorithm=sdpo"])
    assert teacher_kind(cfg) == "ema" and cfg.teacher.resolve_ema_decay(cfg.train.algorithm) == 0.95

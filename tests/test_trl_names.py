"""TRL's GRPOConfig / SDPOConfig names as config aliases (docs/trl_names.md): each alias sets exactly
the key it names, conflicts in one source are errors naming both, names whose meaning differs are
refused with what to set instead, and the docs' table is the code's."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ogls_sd.cli import app
from ogls_sd.config import TRL_NOT_ALIASES, Config, ConfigError, section_classes, trl_aliases

DOC = Path(__file__).resolve().parents[1] / "docs" / "trl_names.md"

# values that the generic rule below would make invalid (sdpo.alpha needs mode != sampled_token, ...)
SPECIAL = {"distillation_alpha": None, "distillation_mode": "full_logits", "report_to": "none",
           "vllm_mode": "server", "vllm_server_base_url": "http://10.0.0.1:9000"}


def _other_value(key: str):
    """A valid value of ``key`` (section.field) that differs from its default."""
    sec, name = key.split(".")
    f = {f.name: f for f in dataclasses.fields(section_classes()[sec])}[name]
    default = getattr(section_classes()[sec](), name)
    choices = f.metadata.get("choices")
    if choices:
        return next(c for c in choices if c != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2 if default else 0.125
    return default.replace("{prompt}", "Q: {prompt}") if "{prompt}" in default else default + "_x"


def test_every_alias_sets_exactly_the_key_it_names():
    aliases = trl_aliases()
    assert len(aliases) >= 30 and aliases["learning_rate"] == "train.lr" and aliases["distillation_mode"] == "sdpo.mode"
    for trl, ours in aliases.items():
        extra = ["sdpo.mode=full_logits"] if trl == "distillation_alpha" else []
        value = SPECIAL.get(trl) or _other_value(ours)
        text = yaml.safe_dump(value, default_style='"' if isinstance(value, str) else None).strip().removesuffix("...").strip()
        by_alias = Config.load(None, [*extra, f"{trl}={text}"])
        by_key = Config.load(None, [*extra, f"{ours}={text}"])
        assert by_alias == by_key, trl
        sec, name = ours.split(".")
        assert getattr(getattr(by_alias, sec), name) == value != getattr(getattr(Config(), sec), name), trl


def test_aliases_in_a_yaml_file_and_the_precedence_of_overrides(tmp_path):
    f = tmp_path / "trl.yaml"
    f.write_text("learning_rate: 3.0e-6\nnum_generations: 4\nmax_completion_length: 256\ntrain:\n  steps: 7\n")
    cfg = Config.load(f)
    assert (cfg.train.lr, cfg.rollout.num_generations, cfg.rollout.max_new_tokens, cfg.train.steps) == (3e-6, 4, 256, 7)
    assert "learning_rate" not in cfg.to_yaml() and "lr: 3.0e-06" in cfg.to_yaml()  # the run records our key
    # an override wins over the file, under either name
    assert Config.load(f, ["train.lr=1e-5"]).train.lr == 1e-5
    assert Config.load(f, ["max_steps=9"]).train.steps == 9
    # both names in one source: an error naming both
    f.write_text("learning_rate: 3.0e-6\ntrain:\n  lr: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"trl\.yaml: learning_rate \(the TRL name of train\.lr\) and train\.lr both given"):
        Config.load(f)
    with pytest.raises(ConfigError, match=r"overrides: max_steps \(the TRL name of train\.steps\) and train\.steps both"):
        Config.load(None, ["train.steps=3", "max_steps=4"])
    with pytest.raises(ConfigError, match=r"learning_rate .* and train\.lr both given"):
        Config.from_dict({"learning_rate": 1e-5, "train": {"lr": 1e-4}})
    assert Config.from_dict({"learning_rate": 1e-5}).train.lr == 1e-5
    f.write_text("learning_rate: 3.0e-6\ntrain:\nrollout:\n")  # empty sections are empty mappings
    assert Config.load(f, ["num_generations=3"]).train.lr == 3e-6


def test_names_whose_meaning_differs_are_refused_with_what_to_set():
    with pytest.raises(ConfigError, match=r"beta: a TRL name this config does not take as an alias: .*grpo\.kl_coef.*"
                                          r"loss\.beta"):
        Config.load(None, ["beta=0.04"])
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size: .*train\.prompts_per_step"):
        Config.from_dict({"per_device_train_batch_size": 8})
    # a TRL name inside a section is an unknown key whose message names ours
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train\.learning_rate \(TRL's learning_rate is train\.lr"):
        Config.load(None, ["train.learning_rate=1e-5"])
    with pytest.raises(ConfigError, match=r"or a TRL name .*\(did you mean num_generations\?\)"):
        Config.load(None, ["num_generation=4"])


def test_cli_takes_trl_names_and_help_lists_them(tmp_path):
    res = CliRunner().invoke(app, ["check", "--no-model", "--print", "learning_rate=2e-6", "num_generations=4",
                                   "warmstart.steps=0"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    printed = yaml.safe_load(res.output.split("\nconfig: ok")[0])
    assert printed["train"]["lr"] == 2e-6 and printed["rollout"]["num_generations"] == 4
    res = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "learning_rate=train.lr" in " ".join(res.output.split()) and "docs/trl_names.md" in res.output


def _doc_rows() -> list[tuple[list[str], str, str]]:
    """(TRL names, our keys, alias column) of every table row of docs/trl_names.md."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows.append((re.findall(r"`([^`]+)`", cells[0]), cells[1], cells[2]))
    return rows


def test_the_docs_table_is_the_code():
    rows = _doc_rows()
    documented = {names[0]: ours for names, ours, alias in rows if alias == "yes"}
    assert {t: f"`{o}`" for t, o in trl_aliases().items()} == {t: o.split(" ")[0] for t, o in documented.items()}
    assert all(len(names) == 1 for names, _, alias in rows if alias == "yes")
    refused = {n for names, _, alias in rows if alias == "*no*" for n in names}
    assert set(TRL_NOT_ALIASES) <= refused
    assert not set(TRL_NOT_ALIASES) & set(trl_aliases())


def test_every_name_is_a_field_of_trls_configs():
    pytest.importorskip("trl", reason="TRL is the peer (the bench extra: pip install -e '.[bench]')")
    from trl import GRPOConfig
    from trl.experimental.sdpo import SDPOConfig

    fields = {f.name for f in dataclasses.fields(GRPOConfig)} | {f.name for f in dataclasses.fields(SDPOConfig)}
    assert set(trl_aliases()) <= fields
    assert set(TRL_NOT_ALIASES) - {"reward_funcs"} <= fields  # reward_funcs is the trainer's argument
    assert fields >= {n for names, _, _ in _doc_rows() for n in names if not n.endswith("*")} - {"reward_funcs"}

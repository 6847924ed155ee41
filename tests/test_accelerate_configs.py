"""configs/accelerate/*.yaml: each parses, has the keys its strategy needs, and goes through
accelerate's own launch-time processing (config loader, `accelerate launch` validation, the
environment the launcher hands to the processes, and the FSDP / DeepSpeed plugin built from it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "zero2.yaml": "DEEPSPEED", "zero3.yaml": "DEEPSPEED"}
REQUIRED = ("compute_environment", "distributed_type", "num_machines", "num_processes", "machine_rank", "use_cpu")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_required_keys(name):
    d = yaml.safe_load((CONFIGS / name).read_text())
    assert all(k in d for k in REQUIRED), [k for k in REQUIRED if k not in d]
    assert d["distributed_type"] == EXPECTED[name] and d["use_cpu"] is False
    if name == "fsdp.yaml":
        assert d["fsdp_config"]["fsdp_version"] == 2 and d["fsdp_config"]["fsdp_auto_wrap_policy"]
    if d["distributed_type"] == "DEEPSPEED":
        ds_file = ROOT / d["deepspeed_config"]["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] == (2 if name == "zero2.yaml" else 3)
        # no dataloader goes through accelerate.prepare: DeepSpeed needs an explicit micro batch size
        assert isinstance(ds["train_micro_batch_size_per_gpu"], int)
        # accelerate refuses mixed_precision next to a deepspeed_config_file
        assert "mixed_precision" not in d


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_accepts_config(name, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    monkeypatch.chdir(ROOT)  # DeepSpeed JSON paths are relative to the repository root
    cfg = load_config_from_file(str(CONFIGS / name))
    assert isinstance(cfg, ClusterConfig) and cfg.distributed_type.value == EXPECTED[name]
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "ogls_sd.cli", "train"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    assert args.num_processes == 8 and args.module
    if args.use_deepspeed:  # what `accelerate launch` does before starting the DeepSpeed processes
        fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    with mock.patch.dict(os.environ, env):
        if name == "fsdp.yaml":
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        elif args.use_deepspeed:
            from accelerate.utils import DeepSpeedPlugin

            plugin = DeepSpeedPlugin()  # raises on fields accelerate refuses next to a JSON file
            assert plugin.zero_stage == (2 if name == "zero2.yaml" else 3)
        else:
            assert args.multi_gpu

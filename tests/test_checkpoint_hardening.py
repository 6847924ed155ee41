"""Checkpoint hardening (issue 12): keep_last=0, resuming to fewer steps, config and initial-weights
fingerprints, missing EMA state, corrupt checkpoints (manifest + fallback), disk full while
writing, and what counts as a checkpoint directory. Every failure is one ``error:`` line."""

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ogls_sd import checkpoint as ck
from ogls_sd.checkpoint import (CheckpointError, check_resume_config, latest_checkpoint, resolve_resume, save_checkpoint,
                                verify_checkpoint)
from ogls_sd.cli import app
from ogls_sd.teacher import Teacher

from conftest import TINY_OVERRIDES

runner = CliRunner()


def _train(monkeypatch, out: Path, ws: Path, *extra: str):
    monkeypatch.setenv("COLUMNS", "4000")  # rich: one message = one line
    args = ["train", *TINY_OVERRIDES, f"warmstart.cache_dir={ws}", "eval.before_after=false", "train.report_to=none",
            "steering.no_positive=reference", "-o", str(out), *extra]
    return runner.invoke(app, args)


def _ok(res):
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def _one_error_line(res, *needles: str) -> str:
    """Exit 1 with exactly one ``error:`` line holding every needle, and no traceback."""
    assert res.exit_code == 1, (res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    errs = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1, res.output
    for n in needles:
        assert n in errs[0], (n, errs[0])
    return errs[0]


def _snapshot(run: Path) -> dict:
    """Every file of a run directory with its sha256."""
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}  # .lock: the run lock (runlock.py)


def _metric_steps(run: Path) -> list[int]:
    """Steps of the training records (not the ``resume/changed`` ones)."""
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _step(run: Path, n: int) -> Path:
    return run / "checkpoints" / f"step_{n:06d}"


# ---------------------------------------------------------------- 1. train.keep_last=0 keeps all
def test_keep_last_zero_keeps_every_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _ok(_train(monkeypatch, out, tmp_path / "ws", "train.steps=3", "train.save_every=1", "train.keep_last=0"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002", "step_000003"]
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["checkpoint"]).is_dir() and verify_checkpoint(Path(summary["checkpoint"]))
    out1 = tmp_path / "run1"  # keep_last=1 still rotates, and never the final checkpoint
    _ok(_train(monkeypatch, out1, tmp_path / "ws", "train.steps=3", "train.save_every=1", "train.keep_last=1"))
    assert [p.name for p in (out1 / "checkpoints").iterdir()] == ["step_000003"]
    from ogls_sd.config import describe_fields

    assert "0 = keep all" in dict((k, h) for k, _, h in describe_fields())["train.keep_last"]


# ------------------------------------------------------- 2. resuming to fewer steps than done
def test_resume_to_fewer_steps_is_an_error_and_rewrites_nothing(tmp_path, monkeypatch):
    out, ws = tmp_path / "run", tmp_path / "ws"
    _ok(_train(monkeypatch, out, ws, "train.steps=4", "train.save_every=1", "train.keep_last=2"))
    before = _snapshot(out)
    res = _train(monkeypatch, out, ws, "train.steps=2", "train.save_every=1", "train.keep_last=2", "--resume", "latest")
    _one_error_line(res, "step 4", "train.steps=2")
    assert _snapshot(out) == before  # no checkpoint, metric or summary rewritten
    assert _metric_steps(out) == [1, 2, 3, 4]
    # train.steps equal to the steps done: documented no-op
    res = _ok(_train(monkeypatch, out, ws, "train.steps=4", "train.save_every=1", "train.keep_last=2", "--resume", "latest"))
    assert "nothing to do" in res.output
    assert _snapshot(out) == before
    # an explicit older checkpoint would overwrite the later ones: refused as well
    res = _train(monkeypatch, out, ws, "train.steps=4", "--resume", str(_step(out, 3)))
    _one_error_line(res, "step_000004", "overwrite")
    assert _snapshot(out) == before


# ---------------------------------------------- 3. config and initial weights are fingerprinted
def test_resume_refuses_config_changes_and_records_allowed_ones(tmp_path, monkeypatch):
    out, ws = tmp_path / "run", tmp_path / "ws"
    base = ("train.save_every=1", "train.keep_last=10")
    _ok(_train(monkeypatch, out, ws, "train.steps=2", *base))
    state = json.loads((_step(out, 2) / "state.json").read_text())
    assert state["config"]["train"]["lr"] == 1e-4 and len(state["init_weights"]["sha256"]) == 64
    before = _snapshot(out)

    res = _train(monkeypatch, out, ws, "train.steps=3", *base, "train.algorithm=grpo", "train.lr=0.01", "data.seed=5",
                 "--resume", "latest")
    line = _one_error_line(res, "train.algorithm: 'ogls_sd' -> 'grpo'", "train.lr: 0.0001 -> 0.01", "data.seed: 0 -> 5")
    assert "train.steps" not in line  # an allowed change is not listed
    assert _snapshot(out) == before  # config.yaml included

    # allowed: more steps, checkpoint policy, evaluation; recorded in metrics.jsonl
    _ok(_train(monkeypatch, out, ws, "train.steps=3", "train.save_every=1", "train.keep_last=5", "eval.max_new_tokens=8",
               "--resume", "latest"))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    changed = [r for r in recs if "resume/changed" in r]
    assert changed == [{"step": 2, "resume/changed": {"train.steps": [2, 3], "train.keep_last": [10, 5],
                                                      "eval.max_new_tokens": [12, 8]}}]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]

    # the initial weights (the warm start the run began from) changed: refused
    (cache,) = [p for p in ws.iterdir() if p.is_dir()]
    sd = load_file(cache / "model.safetensors")
    save_file({k: v * 1.01 for k, v in sd.items()}, cache / "model.safetensors", metadata={"format": "pt"})
    record = json.loads((cache / "warmstart.json").read_text())  # a rebuilt cache: its record matches its weights
    record["weights_sha256"] = hashlib.sha256((cache / "model.safetensors").read_bytes()).hexdigest()
    (cache / "warmstart.json").write_text(json.dumps(record))
    before = _snapshot(out)
    res = _train(monkeypatch, out, ws, "train.steps=4", "train.save_every=1", "train.keep_last=5", "eval.max_new_tokens=8",
                 "--resume", "latest")
    _one_error_line(res, "initial weights", str(cache))
    assert {k: v for k, v in _snapshot(out).items() if k != "config.yaml"} == \
        {k: v for k, v in before.items() if k != "config.yaml"}


def test_allowed_resume_changes_unit():
    from ogls_sd.config import Config

    old = Config.load(None, ["train.steps=2"]).to_dict()
    new = Config.load(None, ["train.steps=5", "train.resume=latest", "eval.every=2", "train.report_to=none"]).to_dict()
    assert check_resume_config(Path("c"), old, new) == {"train.steps": (2, 5), "eval.every": (10, 2),
                                                        "train.report_to": ("tensorboard", "none")}
    bad = Config.load(None, ["train.steps=5", "rollout.temperature=0.5", "train.micro_batch_size=4"]).to_dict()
    with pytest.raises(CheckpointError, match=r"rollout.temperature: 1.0 -> 0.5, train.micro_batch_size: 16 -> 4"):
        check_resume_config(Path("c"), old, bad)


# ------------------------------------------------------------ 4. missing EMA state is an error
def test_missing_ema_state_is_an_error_naming_the_file(tmp_path, monkeypatch):
    out, ws = tmp_path / "run", tmp_path / "ws"
    _ok(_train(monkeypatch, out, ws, "train.steps=1", "teacher.kind=ema", "teacher.ema_decay=0.5"))
    ckpt = _step(out, 1)
    (ckpt / "teacher_ema.safetensors").unlink()
    res = _train(monkeypatch, out, ws, "train.steps=2", "teacher.kind=ema", "teacher.ema_decay=0.5", "--resume", str(ckpt))
    _one_error_line(res, "teacher_ema.safetensors", "missing")
    # a checkpoint without a manifest (older format): still refused, by the loader
    _as_format_1(ckpt)
    res = _train(monkeypatch, out, ws, "train.steps=2", "teacher.kind=ema", "teacher.ema_decay=0.5", "--resume", str(ckpt))
    _one_error_line(res, str(ckpt / "teacher_ema.safetensors"), "missing")
    assert not _step(out, 2).exists()


# ------------------------------------------------------------------ 5. corrupt checkpoints
def _truncate(p: Path, keep: float) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # inside the tensor data, not the header
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated weights": ("model/model.safetensors", lambda p: _truncate(p, 0.5)),
    "half trainer state": ("trainer_state.pt", lambda p: _truncate(p, 0.5)),
    "empty trainer state": ("trainer_state.pt", lambda p: p.write_bytes(b"")),
    "invalid state.json": ("state.json", lambda p: p.write_text('{"step": 2, "conf')),
    "flipped weight bytes": ("model/model.safetensors", _flip),
}


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    import os

    base = tmp_path_factory.mktemp("corrupt")
    out, ws = base / "run", base / "ws"
    os.environ["COLUMNS"] = "4000"
    try:
        _ok(runner.invoke(app, ["train", *TINY_OVERRIDES, f"warmstart.cache_dir={ws}", "eval.before_after=false",
                                "train.report_to=none", "steering.no_positive=reference", "train.steps=2",
                                "train.save_every=1", "train.keep_last=10", "-o", str(out)]))
    finally:
        del os.environ["COLUMNS"]
    return out, ws


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_detected_and_latest_falls_back(tmp_path, monkeypatch, two_step_run, kind):
    src, ws = two_step_run
    rel, corrupt = CORRUPTIONS[kind]
    out = tmp_path / "run"
    shutil.copytree(src, out)
    corrupt(_step(out, 2) / rel)
    # an explicit path: one line naming the file
    res = _train(monkeypatch, out, ws, "train.steps=3", "train.save_every=1", "train.keep_last=10",
                 "--resume", str(_step(out, 2)))
    _one_error_line(res, str(_step(out, 2) / rel))
    # latest: says what it skipped and why, continues from the newest checkpoint that verifies
    res = _ok(_train(monkeypatch, out, ws, "train.steps=3", "train.save_every=1", "train.keep_last=10",
                     "--resume", "latest"))
    assert "skipping checkpoint step_000002" in res.output and rel.split("/")[-1] in res.output
    assert "resuming from step_000001" in res.output
    assert _metric_steps(out) == [1, 2, 3]
    assert all(verify_checkpoint(_step(out, n)) for n in (1, 2, 3))  # step 2 rewritten
    # the resumed run equals the uninterrupted one at step 2 (same weights)
    a, b = load_file(_step(src, 2) / "model" / "model.safetensors"), load_file(_step(out, 2) / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _as_format_1(ckpt: Path) -> None:
    """What an older version wrote: no manifest, state.json without format 2."""
    (ckpt / "manifest.json").unlink(missing_ok=True)
    st = json.loads((ckpt / "state.json").read_text())
    st["format"] = 1
    (ckpt / "state.json").write_text(json.dumps(st))


@pytest.mark.parametrize("kind", [k for k in CORRUPTIONS if k != "flipped weight bytes"])
def test_corrupt_checkpoint_without_manifest_is_one_line_naming_the_file(tmp_path, monkeypatch, two_step_run, kind):
    """Checkpoints of older versions have no manifest: a warning, and an unreadable file is
    still a one-line error naming it (flipped bytes cannot be detected without the manifest)."""
    src, ws = two_step_run
    rel, corrupt = CORRUPTIONS[kind]
    out = tmp_path / "run"
    shutil.copytree(src, out)
    _as_format_1(_step(out, 2))
    corrupt(_step(out, 2) / rel)
    res = _train(monkeypatch, out, ws, "train.steps=3", "--resume", str(_step(out, 2)))
    _one_error_line(res, str(_step(out, 2) / rel))
    assert "no manifest.json" in res.output


def test_checkpoint_without_manifest_resumes_with_a_warning(tmp_path, monkeypatch, two_step_run):
    src, ws = two_step_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    _as_format_1(_step(out, 2))
    res = _ok(_train(monkeypatch, out, ws, "train.steps=3", "train.save_every=1", "train.keep_last=10", "--resume", "latest"))
    assert "warning:" in res.output and "no manifest.json" in res.output
    assert _metric_steps(out) == [1, 2, 3]


def test_no_checkpoint_verifies_is_one_line(tmp_path, monkeypatch, two_step_run):
    src, ws = two_step_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    for n in (1, 2):
        _truncate(_step(out, n) / "trainer_state.pt", 0.5)
    before = _snapshot(out)
    res = _train(monkeypatch, out, ws, "train.steps=3", "--resume", "latest")
    _one_error_line(res, "no checkpoint", "step_000002", "step_000001", "trainer_state.pt")
    assert _snapshot(out) == before


# ------------------------------------------------------------------------ 6. disk full
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _torch_short_write(*a, **k):
    raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1472 vs 1366")


def _safetensors_full(*a, **k):
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                          'message: "No space left on device" })')


@pytest.mark.parametrize("writer", ["model", "torch", "safetensors"])
def test_disk_full_while_saving_removes_the_partial_checkpoint_and_keeps_the_previous(tmp_path, monkeypatch, tok,
                                                                                      tiny_model, writer):
    teacher = Teacher(tiny_model, "ema", ema_decay=0.5)
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    first = save_checkpoint(tmp_path, 1, tiny_model, tok, opt, None, teacher)
    if writer == "model":
        monkeypatch.setattr(tiny_model, "save_pretrained", _enospc)
    elif writer == "torch":
        monkeypatch.setattr(ck.torch, "save", _torch_short_write)
    else:
        monkeypatch.setattr(ck, "save_file", _safetensors_full)
    with pytest.raises(CheckpointError) as ei:
        save_checkpoint(tmp_path, 2, tiny_model, tok, opt, None, teacher)
    msg = str(ei.value)
    assert "\n" not in msg and "no space left" in msg and str(_step(tmp_path, 2)) in msg and "[" not in msg
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    assert verify_checkpoint(first)


def test_disk_full_during_training_is_one_line(tmp_path, monkeypatch):
    real, calls = torch.save, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            _enospc()
        return real(*a, **k)

    monkeypatch.setattr(ck.torch, "save", second_fails)
    out = tmp_path / "run"
    res = _train(monkeypatch, out, tmp_path / "ws", "train.steps=3", "train.save_every=1", "train.keep_last=10")
    _one_error_line(res, "no space left", str(_step(out, 2)))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]
    assert verify_checkpoint(_step(out, 1))


# ------------------------------------------------------- 8. only step_<digits> is a checkpoint
def test_latest_is_the_highest_step_of_step_digit_directories(tmp_path, tok, tiny_model):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    save_checkpoint(tmp_path, 999_999, tiny_model, tok, opt, None, None)
    newest = save_checkpoint(tmp_path, 1_000_000, tiny_model, tok, opt, None, None, keep_last=5)
    root = tmp_path / "checkpoints"
    for name in ("step_notes", "step_000001.tmp", "step_12a", "step_"):
        (root / name).mkdir()
    assert latest_checkpoint(tmp_path) == newest  # by step number, not by name
    assert resolve_resume(tmp_path, "latest") == newest
    save_checkpoint(tmp_path, 1_000_001, tiny_model, tok, opt, None, None, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_", "step_000001.tmp", "step_1000001", "step_12a",
                                                      "step_notes"]


def test_resume_latest_with_a_notes_directory(tmp_path, monkeypatch):
    out, ws = tmp_path / "run", tmp_path / "ws"
    _ok(_train(monkeypatch, out, ws, "train.steps=1"))
    (out / "checkpoints" / "step_notes").mkdir()
    (out / "checkpoints" / "step_notes" / "README").write_text("my notes")
    _ok(_train(monkeypatch, out, ws, "train.steps=2", "--resume", "latest"))
    assert _metric_steps(out) == [1, 2]
    assert (out / "checkpoints" / "step_notes" / "README").read_text() == "my notes"

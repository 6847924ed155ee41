"""Issue 12, items 7 and 13: one training run per output directory (``<output_dir>/.lock``), and
every failure of the CLI is one ``error:`` line naming the file or field, with a non-zero exit,
unless ``--debug`` / ``OGLS_SD_DEBUG=1`` asks for the traceback."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ogls_sd.cli import app

from conftest import TINY_OVERRIDES

runner = CliRunner()
FAST = ["eval.before_after=false", "train.report_to=none"]


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch):
    monkeypatch.delenv("OGLS_SD_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", "80")  # a wrapped message would show up as a second line


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="80")
    for k in ("OGLS_SD_DEBUG", "RANK", "WORLD_SIZE"):
        env.pop(k, None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ogls_sd.cli", *args]


def _train_args(out: Path, ws: Path, *extra: str) -> list[str]:
    return ["train", *TINY_OVERRIDES, f"warmstart.cache_dir={ws}", *FAST, "-o", str(out), *extra]


def _error_line(output: str, *needles: str) -> str:
    """Exactly one ``error:`` line, no traceback, and every needle on that line."""
    assert "Traceback" not in output, output
    errs = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1, output
    for n in needles:
        assert n in errs[0], (n, errs[0])
    return errs[0]


def _fails(res, code: int, *needles: str) -> str:
    assert res.exit_code == code, (res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return _error_line(res.output, *needles)


# --------------------------------------------------------------- 7. one run per output directory
HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\\n".encode())
    print("locked", flush=True)
    time.sleep(600)
""")


def test_locked_output_dir_refuses_a_second_run_and_a_killed_holder_does_not_block(tmp_path):
    out, ws = tmp_path / "run", tmp_path / "ws"
    out.mkdir()
    first = {"metrics.jsonl": '{"step": 1}\n', "config.yaml": "the first run's\n", "summary.json": "{}\n"}
    for name, text in first.items():
        (out / name).write_text(text)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = runner.invoke(app, _train_args(out, ws))
        _fails(res, 1, f"pid {holder.pid}", str(out), "in use")
        for name, text in first.items():  # the second run touched nothing of the first's
            assert (out / name).read_text() == text, name
        assert not (out / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the lock died with its holder: no stale lock file blocks the next run (--overwrite: the
    # directory holds the first run's files, which a fresh run replaces only when asked)
    res = runner.invoke(app, _train_args(out, ws, "--overwrite"))
    assert res.exit_code == 0, (res.output, res.exception)
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert (out / ".lock").read_text() == ""  # released (and the PID cleared) when train() returned
    res = runner.invoke(app, _train_args(out, ws, "--overwrite"))  # the same process takes it again
    assert res.exit_code == 0, (res.output, res.exception)


def test_two_cli_runs_on_one_output_dir_and_sigkill(tmp_path):
    """The issue's scenario with real processes: a second ``ogls-sd train -o`` on a running run's
    directory exits 1 with one line naming the first's PID; SIGKILL of the first frees the directory."""
    out, ws = tmp_path / "run", tmp_path / "ws"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_cli(*_train_args(out, ws, "train.steps=100000")), cwd=tmp_path, env=_env(),
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600  # a liveness bound, not a speed check: generous for a loaded machine
        while not (out / "config.yaml").is_file():  # the first run is under way
            assert first.poll() is None and time.time() < deadline, \
                f"the first run did not start: {(tmp_path / 'first.log').read_text()[-2000:]}"
            time.sleep(0.1)
        second = subprocess.run(_cli(*_train_args(out, ws)), cwd=tmp_path, env=_env(), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 1, second.stdout + second.stderr
        _error_line(second.stderr, f"pid {first.pid}", str(out))
        assert first.poll() is None  # the first run goes on
        assert (out / ".lock").read_text().split()[0] == str(first.pid)
        from ogls_sd.runlock import RunLockedError, run_lock

        with pytest.raises(RunLockedError, match=f"pid {first.pid}"):
            run_lock(out).acquire()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with run_lock(out) as lock:  # no child process of the killed run keeps the lock alive
        assert (out / ".lock").read_text().split()[0] == str(os.getpid())
        assert lock.fd is not None


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    """Data parallel: ranks other than 0 (which write nothing of the run) never wait for or take it."""
    from ogls_sd.runlock import RunLockedError, run_lock

    with run_lock(tmp_path):
        with pytest.raises(RunLockedError):  # a second holder in the same process is refused too
            run_lock(tmp_path).acquire()
        monkeypatch.setenv("RANK", "1")
        with run_lock(tmp_path) as other:
            assert other.fd is None


# ------------------------------------------------------------ 13. one line naming file or field
@pytest.mark.parametrize("name, content, needles", [
    ("latin1.yaml", b"train:\n  steps: 3\n  output_dir: caf\xe9\n", ["latin1.yaml", "line 3", "not UTF-8"]),
    ("binary.yaml", bytes(range(256)) * 4, ["binary.yaml", "binary file"]),
    ("gzipped.yaml", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcb\x48\xcd\xc9\xc9\x07\x00", ["gzipped.yaml", "binary"]),
    ("control.yaml", b"train:\n  steps: 3\x01\n", ["control.yaml", "line 2", "unacceptable character"]),
    ("dir.yaml", None, ["dir.yaml", "not a file"]),
])
def test_unreadable_config_file_is_one_line_naming_it(tmp_path, name, content, needles):
    p = tmp_path / name
    if content is None:
        p.mkdir()
    else:
        p.write_bytes(content)
    res = runner.invoke(app, ["train", "--config", str(p)])
    _fails(res, 2, *needles)


@pytest.mark.parametrize("name, needle", [
    ("{tmp}/nonexistent", "no such file or directory"),  # (not /nonexistent itself: a test run as root may create it)
    ("{tmp}/empty_dir", "no config.json"),
])
def test_missing_model_is_one_line_naming_model_name(tmp_path, name, needle):
    (tmp_path / "empty_dir").mkdir()
    name = name.format(tmp=tmp_path)
    res = runner.invoke(app, ["train", f"model.name={name}", *FAST, "-o", str(tmp_path / "run")])
    _fails(res, 1, f"model.name={name}", needle)


class _Evil:
    def __reduce__(self):  # unpickling would run `touch <marker>`
        return (os.system, (f"touch {self.marker}",))


def _evil_state(path: Path, marker: Path) -> None:
    evil = _Evil()
    evil.marker = marker
    torch.save({"optimizer": evil, "scheduler": None, "step": 1, "rng": {}}, path)


def test_malicious_trainer_state_from_resume_is_one_line_naming_the_file(tmp_path):
    out, ws, marker = tmp_path / "run", tmp_path / "ws", tmp_path / "PWNED"
    res = runner.invoke(app, _train_args(out, ws, "steering.no_positive=reference"))
    assert res.exit_code == 0, (res.output, res.exception)
    ckpt = out / "checkpoints" / "step_000001"
    _evil_state(ckpt / "trainer_state.pt", marker)
    (ckpt / "manifest.json").unlink(missing_ok=True)  # an attacker would rewrite it as well
    from ogls_sd.checkpoint import write_manifest

    write_manifest(ckpt)
    res = runner.invoke(app, _train_args(out, ws, "steering.no_positive=reference", "train.steps=2",
                                         "--resume", str(ckpt)))
    _fails(res, 1, str(ckpt / "trainer_state.pt"))
    assert not marker.exists()


def test_unpickling_error_reaching_the_cli_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """Whatever checkpoint.py makes of it: a raw weights_only refusal that reaches the CLI is one
    line naming the file (not torch's ~50-line explanation)."""
    import ogls_sd.trainer

    bad, marker = tmp_path / "trainer_state.pt", tmp_path / "PWNED"
    _evil_state(bad, marker)
    monkeypatch.setattr(ogls_sd.trainer, "train", lambda cfg, **kw: torch.load(bad, weights_only=True))
    res = runner.invoke(app, ["train", "-o", str(tmp_path / "run")])
    line = _fails(res, 1, str(bad), "weights_only", "posix.system")
    assert "(run with --debug" not in line
    assert not marker.exists()


# ------------------------------------------------- every failure: one line, --debug shows traceback
def test_unexpected_errors_keep_their_type_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    import ogls_sd.distributed
    import ogls_sd.trainer

    args = ["train", "-o", str(tmp_path / "run")]

    def bug(cfg, **kw):
        return {}["accuracy"]  # a programming error, not a user's

    monkeypatch.setattr(ogls_sd.trainer, "train", bug)
    assert _fails(runner.invoke(app, args), 1) == "error: KeyError: accuracy (run with --debug for the traceback)"
    # a library's ValueError is not dressed up as one of our messages either
    monkeypatch.setattr(ogls_sd.trainer, "train", lambda cfg, **kw: int("x"))
    _fails(runner.invoke(app, args), 1, "error: ValueError: invalid literal", "(run with --debug for the traceback)")
    # while a deliberate error of ours is just its message
    monkeypatch.setattr(ogls_sd.distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(ogls_sd.trainer, "train", lambda cfg, **kw: ogls_sd.distributed.rank_slice(3))
    assert _fails(runner.invoke(app, args), 1) == (
        "error: train.prompts_per_step=3 must be divisible by the number of processes (2)")

    # --debug (after or before the command) and OGLS_SD_DEBUG=1 let the exception through
    monkeypatch.setattr(ogls_sd.trainer, "train", bug)
    for argv in (args + ["--debug"], ["--debug", *args]):
        res = runner.invoke(app, argv)
        assert isinstance(res.exception, KeyError) and "error:" not in res.output
    monkeypatch.setenv("OGLS_SD_DEBUG", "1")
    assert isinstance(runner.invoke(app, args).exception, KeyError)
    monkeypatch.setenv("OGLS_SD_DEBUG", "0")
    _fails(runner.invoke(app, args), 1, "KeyError")

    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["compare", "--help"], ["report", "--help"]):
        res = runner.invoke(app, argv, terminal_width=200)
        assert res.exit_code == 0 and "--debug" in res.output and "OGLS_SD_DEBUG" in res.output, argv


def test_real_process_prints_one_line_or_with_debug_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  steps: \xff\xfe\n")
    plain = subprocess.run(_cli("train", "--config", str(bad)), cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [_error_line(plain.stderr, str(bad), "not UTF-8")]
    debug = subprocess.run(_cli("train", "--config", str(bad)), cwd=tmp_path, env=dict(_env(), OGLS_SD_DEBUG="1"),
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr

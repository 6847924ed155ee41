"""train.report_to: TensorBoard event files under the run directory; clear errors for missing trackers."""

import builtins
import json

import pytest

from ogls_sd.tracking import Tracker, TrackerError, open_tracker


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    tr = open_tracker("tensorboard", tmp_path)
    tr.log({"step": 1, "loss": 0.5, "eval/accuracy": 0.25, "name": "x"})
    tr.log({"step": 2, "loss": 0.25})
    tr.close()
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert files and files[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"loss", "eval/accuracy"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]


def test_none_and_missing_trackers(tmp_path, monkeypatch):
    assert type(open_tracker("none", tmp_path)) is Tracker
    real = builtins.__import__

    def fake(name, *a, **k):
        if name in ("wandb", "trackio"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    for name in ("wandb", "trackio"):
        with pytest.raises(TrackerError, match=f"pip install {name}"):
            open_tracker(name, tmp_path)


def test_training_run_routes_metrics_to_tensorboard(tiny_cfg):
    pytest.importorskip("tensorboard")
    from ogls_sd.trainer import train

    cfg = tiny_cfg("train.steps=2", "eval.every=1", "data.eval_size=2")
    train(cfg)
    run = __import__("pathlib").Path(cfg.train.output_dir)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("eval/accuracy") is not None for r in recs] == [True, True, True]
    s = json.loads((run / "summary.json").read_text())
    assert s["accuracy_after"] == recs[-1]["eval/accuracy"]

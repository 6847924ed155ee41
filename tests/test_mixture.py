"""data.mixture: several sources with sampling weights, each with its own held-out split."""

import json
from collections import Counter

import pytest

from ogls_sd.config import Config, ConfigError
from ogls_sd.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path, prefix: str, n: int):
    rows = [{"problem": f"{prefix} problem {i}: what is {i} + {i}?", "solution": f"{i} + {i} = {2 * i}. \\boxed{{{2 * i}}}",
             "answer": str(2 * i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def two_files(tmp_path):
    return _write(tmp_path / "a.jsonl", "A", 60), _write(tmp_path / "b.jsonl", "B", 40)


def test_prompts_follow_the_weights_and_splits_stay_apart(two_files):
    a, b = two_files
    cfg = Config.load(None, [f"data.mixture={a}=3,{b}=1", "data.eval_size=5"])
    task = get_task(cfg.data)
    assert task.split_sizes == (60 - 5 + 40 - 5, 10)
    assert "a.jsonl (75%): 60 rows -> 55 training, 5 held out" in task.split_line()
    held = task.examples(100, seed=0, split="test")
    assert len(held) == 10 and Counter(e.problem[0] for e in held) == {"A": 5, "B": 5}
    train = [e for step in range(40) for e in task.examples(8, seed=step)]
    frac_a = sum(e.problem.startswith("A") for e in train) / len(train)
    assert 0.68 < frac_a < 0.82  # 320 draws at p = 0.75
    assert not {e.problem for e in train} & {e.problem for e in held}  # never trained on a held-out problem
    assert task.examples(8, seed=3) == task.examples(8, seed=3)  # a function of the step's seed (exact resume)
    assert task.rewards(["so \\boxed{4}", "\\boxed{5}"], ["4", "4"]) == [1.0, 0.0]


@pytest.mark.parametrize("entry, msg", [
    ("a.jsonl", "must be SOURCE=WEIGHT"), ("a.jsonl=x", "is not a number"), ("a.jsonl=0", "must be > 0"),
    ("arith=1", "cannot be mixed"),
])
def test_bad_entries_are_config_errors(entry, msg):
    with pytest.raises(ConfigError, match=msg):
        Config.load(None, [f"data.mixture={entry}"])


def test_trainer_runs_one_step_on_a_mixture(two_files, tiny_cfg):
    from ogls_sd.trainer import train

    a, b = two_files
    summ = train(tiny_cfg(f"data.mixture={a}=1,{b}=1", "data.eval_size=2", "eval.before_after=false", "eval.every=0"))
    assert summ["steps"] == 1 and summ["data_split"] == {"train": 96, "held_out": 4}

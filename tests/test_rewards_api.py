"""Reward functions of your own (``reward.funcs``, ``--reward``), the reasoning-gym scorer, the
success threshold, and the Python API (``from ogls_sd import Config, train, evaluate``)."""

import json
import math
import random
import re
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ogls_sd
from ogls_sd import Config, ConfigError, evaluate, train
from ogls_sd.algorithms import Rollout, StepBatch, Group
from ogls_sd.cli import app
from ogls_sd.data.example import Example
from ogls_sd.data.files import load_examples, load_reasoning_gym, load_rows
from ogls_sd.rewards.functions import RewardError, RewardSet, reasoning_gym_score, resolve
from ogls_sd.tasks import ArithTask
from ogls_sd.trainer import TrainingHalted

from conftest import TINY_OVERRIDES

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"

# A non-math task: answer with the word reversed. `shelf` is an extra column the reward reads.
WORDS = ["cat", "dog", "sun", "moon", "tree", "leaf", "bird", "fish", "star", "rain", "lamp", "road"]
ROWS = [{"problem": f"Reverse the word {w}.", "answer": w[::-1], "shelf": i % 3} for i, w in enumerate(WORDS)]

USER_MODULE = '''
CALLS = []

def ends_with_answer(prompts, completions, answer, problem, reference, id, shelf, **columns):
    n = len(completions)
    assert len(prompts) == len(answer) == len(problem) == len(id) == len(shelf) == n
    assert all(p in q for p, q in zip(problem, prompts)), "a prompt is the rendered student prompt"
    CALLS.append(n)
    return [float(c.strip().endswith(a)) for c, a in zip(completions, answer)]

def shelf_bonus(prompts, completions, shelf, **columns):
    return [0.25 * s + len(c) / 100 for c, s in zip(completions, shelf)]

FAIL_AT = [None]

def flaky(prompts, completions, **columns):
    CALLS.append(len(completions))
    if FAIL_AT[0] is not None and len(CALLS) >= FAIL_AT[0]:
        return [0.0] * (len(completions) - 1)
    return [0.0] * len(completions)
'''


def reference_reward(text: str, answer: str, shelf: int, w_bonus: float) -> float:
    """The user module's total, recomputed independently in float64."""
    return float(text.strip().endswith(answer)) + w_bonus * (0.25 * shelf + len(text) / 100)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"userreward_{random.randrange(10**9)}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rollouts(run: Path) -> list[tuple[dict, dict]]:
    """(group, rollout) of every logged rollout (train.log_completions=1 logs every prompt)."""
    out = []
    for line in (run / "completions.jsonl").read_text().splitlines():
        for g in json.loads(line)["groups"]:
            out += [(g, r) for r in g["rollouts"]]
    return out


LOG_ALL = ["train.log_completions=1", "train.log_completions_prompts=8", "train.report_to=none"]


# ------------------------------------------------------------------------------------ spec parsing
def test_entries_parse_with_weights_and_bad_entries_are_one_line():
    cfg = Config.load(None, ["reward.funcs=verifier,mymod.sub:score=0.25,reasoning_gym=-1"])
    assert cfg.reward.funcs == ["verifier", "mymod.sub:score=0.25", "reasoning_gym=-1"]
    specs = resolve(["verifier=2"], [lambda p, c, **k: [0.0] * len(c), (max, 0.5)])
    assert [s.weight for s in specs] == [2.0, 1.0, 0.5]
    assert specs[0].label == "reward.funcs[0] verifier" and specs[2].label == "rewards[1] max"
    for entry, words in [("verifer", "did you mean verifier"), ("m:f=abc", "weight 'abc' is not a number"),
                         ("m:f=nan", "weight must be finite"), ("m:f:g", "is not NAME or module:function"),
                         ("2m:f", "is not NAME or module:function")]:
        with pytest.raises(ConfigError) as e:
            Config.load(None, [f"reward.funcs=verifier,{entry}"])
        msg = str(e.value)
        assert "reward.funcs[1]" in msg and words in msg and "\n" not in msg, msg
    with pytest.raises(RewardError, match=r"rewards\[0\]: expected a function or \(function, weight\), got int"):
        resolve([], [3])
    with pytest.raises(RewardError, match=r"rewards\[0\]: weight must be a finite number, got inf"):
        resolve([], [(max, math.inf)])


# ----------------------------------------------------------------------------- columns and extras
def test_extra_columns_reach_examples_and_stay_out_of_equality(tmp_path):
    a = Example("p", "r", "1", "x", extra={"shelf": 1})
    b = Example("p", "r", "1", "x", extra={"shelf": 2})
    assert a == b and hash(a) == hash(b) and "shelf" not in repr(a)
    rows = [{"question": "2+2?", "answer": 4, "shelf": "A", "problem": "shadowed", "meta": {"k": [1]}},
            {"question": "3+3?", "answer": 6, "shelf": "B"}]
    res = load_examples(_jsonl(tmp_path / "d.jsonl", rows), columns={"problem": "question", "reference": None})
    assert [ex.extra for ex in res.examples] == [{"shelf": "A", "meta": {"k": [1]}}, {"shelf": "B"}]
    assert res.examples[0].problem == "2+2?"  # an unmapped column named like a field is not passed
    mem = load_rows(rows, {"problem": "question", "reference": None})
    assert [(e.problem, e.answer, e.extra) for e in mem.examples] == [(e.problem, e.answer, e.extra) for e in res.examples]
    assert [e.id for e in mem.examples] == ["data:1", "data:2"]
    with pytest.raises(ValueError, match=r"data: row 2: not a mapping \(got str\)"):
        load_rows([rows[0], "oops"], {"problem": "question"})


def test_weighted_sum_matches_a_float64_reference_and_functions_get_every_column():
    rng = random.Random(0)
    exs = [Example(f"q{i}", f"ref{i}", str(i), f"id{i}", extra={"shelf": i % 4} if i % 2 else {"other": i})
           for i in range(6)]
    seen = {}

    def f(prompts, completions, **cols):
        seen.update(cols)
        return [rng.uniform(-2, 2) for _ in completions]

    outs = []

    def record(fn):
        def wrapped(prompts, completions, **cols):
            v = fn(prompts, completions, **cols)
            outs.append(v)
            return v
        wrapped.__name__ = fn.__name__
        return wrapped

    def g(prompts, completions, shelf, **_):
        return [float(s or 0) * 0.5 for s in shelf]

    weights = [rng.uniform(-1, 1), rng.uniform(0, 3)]
    rs = RewardSet(resolve([], [(record(f), weights[0]), (record(g), weights[1])]), task=None)
    comps = [f"c{i}" for i in range(6)]
    total = rs.score([f"P:{e.problem}" for e in exs], comps, exs)
    ref = [weights[0] * a + weights[1] * b for a, b in zip(*outs)]
    assert all(abs(t - r) < 1e-12 for t, r in zip(total, ref))
    assert seen["problem"] == [e.problem for e in exs] and seen["id"] == [e.id for e in exs]
    assert seen["shelf"] == [None, 1, None, 3, None, 1] and seen["other"] == [0, None, 2, None, 4, None]
    assert rs.last_means == {"f": sum(outs[0]) / 6, "g": sum(outs[1]) / 6}  # unweighted, per function


# ------------------------------------------------------------------------------ bad functions
BAD_RETURNS = {"raise": "1 / 0", "short": "[0.0] * (n - 1)", "nan": "[0.0] * (n - 1) + [float('nan')]",
               "inf": "[float('inf')] * n", "text": "['1'] * n", "none": "None"}


@pytest.mark.parametrize("kind,words", [
    ("raise", "raised ZeroDivisionError: division by zero"),
    ("short", "returned 7 values for 8 completions"),
    ("nan", "returned nan for completion 7 of 8; rewards must be finite"),
    ("inf", "returned inf for completion 0 of 8; rewards must be finite"),
    ("text", "returned str '1' for completion 0 of 8, not a number"),
    ("none", "returned NoneType, not a list of 8 numbers"),
])
def test_each_bad_function_is_one_line_naming_it(kind, words, tmp_path, monkeypatch):
    mod = f"badreward_{kind}"
    (tmp_path / f"{mod}.py").write_text(f"def f(prompts, completions, **_):\n    n = len(completions)\n"
                                        f"    return {BAD_RETURNS[kind]}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rs = RewardSet(resolve(["verifier", f"{mod}:f"]), ArithTask())
    exs = ArithTask().examples(8, seed=0)
    with pytest.raises(RewardError) as e:
        rs.score(["p"] * 8, ["A:1"] * 8, exs)
    assert str(e.value).startswith(f"reward.funcs[1] {mod}:f ") and words in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    sys.modules.pop(mod, None)


def test_import_errors_are_one_config_line_before_anything_loads(tmp_path, monkeypatch):
    (tmp_path / "brokenreward.py").write_text("import no_such_package_xyz\n")
    (tmp_path / "constreward.py").write_text("f = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ws = tmp_path / "ws"
    for entry, words in [("no_such_mod_xyz:f", "cannot import f from no_such_mod_xyz (ModuleNotFoundError"),
                         ("brokenreward:f", "cannot import f from brokenreward (ModuleNotFoundError: No module named "
                                            "'no_such_package_xyz')"),
                         ("constreward:g", "cannot import g from constreward (AttributeError"),
                         ("constreward:f", "constreward.f is a int, not a function")]:
        res = runner.invoke(app, ["train", *TINY_OVERRIDES, f"warmstart.cache_dir={ws}", "-o", str(tmp_path / "run"),
                                  "--reward", entry])
        assert res.exit_code == 2, res.output
        line = res.output.strip()
        assert line.startswith(f"error: reward.funcs[0] {entry}: ") and words in line and "\n" not in line, line
    assert not ws.exists()  # nothing was loaded: no warm start, no model
    sys.modules.pop("constreward", None)


def test_a_failure_during_training_stops_with_the_last_completed_step_and_resumes(tiny_cfg, user_module, tmp_path):
    mod = sys.modules.get(user_module) or __import__(user_module)
    mod.FAIL_AT[0] = 3  # the third call (step 3) returns one value too few
    cfg = tiny_cfg(f"reward.funcs={user_module}:flaky", "train.steps=4", "eval.before_after=false", "eval.every=0",
                   "steering.no_positive=reference")
    with pytest.raises(TrainingHalted) as e:
        ogls_sd.trainer.train(cfg)
    msg = str(e.value)
    assert msg.startswith(f"reward.funcs[0] {user_module}:flaky returned 7 values for 8 completions; stopped with "
                          "checkpoint") and "(step 2)" in msg and "\n" not in msg, msg
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_000002" / "model" / "model.safetensors").is_file()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    mod.FAIL_AT[0] = None  # fixed: the run continues from step 2
    summary = ogls_sd.trainer.train(tiny_cfg(f"reward.funcs={user_module}:flaky", "train.steps=4",
                                             "eval.before_after=false", "eval.every=0",
                                             "steering.no_positive=reference", "train.resume=latest"))
    assert summary["steps"] == 4
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_failure_in_held_out_accuracy_keeps_the_step_it_followed(tiny_cfg, user_module, tmp_path):
    mod = __import__(user_module)
    mod.FAIL_AT[0] = 4  # calls: step 1, its accuracy, step 2, its accuracy (4 held-out problems): fails
    cfg = tiny_cfg(f"reward.funcs={user_module}:flaky", "train.steps=3", "eval.before_after=false", "eval.every=1",
                   "steering.no_positive=reference")
    with pytest.raises(TrainingHalted, match=rf"^reward\.funcs\[0\] {user_module}:flaky returned 3 values for 4 "
                                             r"completions; stopped with checkpoint .*step_000002 \(step 2\)"):
        ogls_sd.trainer.train(cfg)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and "eval/accuracy" in metrics[0] and "eval/accuracy" not in metrics[1]
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / "model" / "model.safetensors").is_file()


def test_the_api_evaluate_is_the_function_and_no_module_shadows_it():
    import ogls_sd.api
    from ogls_sd.accuracy import evaluate_accuracy  # the accuracy code lives in its own module

    assert ogls_sd.evaluate is ogls_sd.api.evaluate and callable(evaluate_accuracy)
    assert "ogls_sd.evaluate" not in sys.modules  # no module of that name: `import ogls_sd.evaluate as m` cannot mislead
    assert {"Config", "ConfigError", "train", "evaluate"} <= set(ogls_sd.__all__) and ogls_sd.algorithms


# ------------------------------------------------------------------------------ threshold
def test_success_threshold_decides_the_pools():
    r = [Rollout(0, [1], True, x, threshold=0.7) for x in (0.7, 0.71, 1.0, -3.0)]
    assert [x.correct for x in r] == [False, True, True, False]  # strictly above
    assert Rollout(0, [1], True, 0.5).correct is False and Rollout(0, [1], True, 0.51).correct  # today's rule
    batch = StepBatch([Group(Example("p", "", "1"), [1], [1], [0, 1, 2, 3])], r)
    assert batch.pools(0) == ([1, 2], [0, 3])
    rs = RewardSet([], ArithTask(), threshold=0.25)
    assert rs.correct([0.25, 0.2500001, 0.0]) == [False, True, False]
    assert Config().reward.success_threshold == 0.5


# ------------------------------------------------------------------------------ validated assignment
def test_assignments_are_checked_and_a_refused_one_changes_nothing():
    cfg = Config()
    with pytest.raises(ConfigError, match=r"^train\.lr: must be > 0, got -1\.0$"):
        cfg.train.lr = -1
    assert cfg.train.lr == 1e-4
    with pytest.raises(ConfigError, match=r"^train\.algorithm: 'grp' is not one of .*did you mean grpo"):
        cfg.train.algorithm = "grp"
    with pytest.raises(ConfigError, match=r"^model\.lora: expected true/false, got 1$"):
        cfg.model.lora = 1
    with pytest.raises(ConfigError, match=r"warmstart\.student_fraction \+ warmstart\.reference_fraction must be <= 1"):
        cfg.warmstart.student_fraction = 0.9
    assert cfg.warmstart.student_fraction == 0.4
    with pytest.raises(ConfigError, match=r"reward\.funcs\[0\]: 'nope' is not one of verifier, reasoning_gym"):
        cfg.reward.funcs = ["nope"]
    cfg.train.lr, cfg.train.steps, cfg.reward.funcs = "3e-4", 7.0, "a:f,b:g=2"  # coerced like YAML values
    assert (cfg.train.lr, cfg.train.steps, cfg.reward.funcs) == (3e-4, 7, ["a:f", "b:g=2"])
    cfg.rollout.num_generations = 1  # a rule across sections: checked when the run starts
    with pytest.raises(ConfigError, match=r"cfg: rollout\.num_generations: must be >= 2 with train\.algorithm=ogls_sd"):
        train(cfg)


# ------------------------------------------------------------------------------ reasoning-gym
def _last_box(text: str):
    """Independent extraction for the test strings (no nested braces): the last \\boxed{...}."""
    found = [m for m in re.findall(r"\\boxed\{([^{}]*)\}", text) if m.strip()]
    return found[-1].strip() if found else None


@pytest.mark.parametrize("name", ["basic_arithmetic", "chain_sum", "leg_counting"])
def test_reasoning_gym_scores_are_its_own_score_answer(name):
    import reasoning_gym

    res = load_reasoning_gym(name, size=6, seed=3)
    ds = reasoning_gym.create_dataset(name, size=6, seed=3)
    exs = res.examples
    comps = []
    for i, ex in enumerate(exs):
        a = ex.answer
        comps += [f"so \\boxed{{{a}}}", f"\\boxed{{7}} then \\boxed{{ {a}.0 }}", f"{a}", f"\\boxed{{x{a}}}", ""]
    per = [ex for ex in exs for _ in range(5)]
    got = reasoning_gym_score(["p"] * len(comps), comps, **{"entry": [ex.extra["entry"] for ex in per]})
    by_question = {e["question"]: e for e in ds}
    want = [ds.score_answer(_last_box(c), by_question[ex.problem]) for c, ex in zip(comps, per)]
    assert got == want
    assert max(got) == 1.0 and min(got) == 0.0


def test_reasoning_gym_refuses_a_scorer_that_evals_the_answer_and_needs_its_entries():
    res = load_reasoning_gym("string_insertion", size=2, seed=0)
    with pytest.raises(ValueError, match="'string_insertion' scores by calling eval\\(\\) on the answer"):
        reasoning_gym_score(["p"], ["\\boxed{1}"], entry=[res.examples[0].extra["entry"]])
    rs = RewardSet(resolve(["reasoning_gym"]), ArithTask())
    with pytest.raises(RewardError, match=r"reward\.funcs\[0\] reasoning_gym raised ValueError: an example has no "
                                          r"reasoning-gym entry: use it with data\.task=reasoning_gym:<name>"):
        rs.score(["p"], ["A:1"], ArithTask().examples(1, seed=0))


def test_training_on_reasoning_gym_is_scored_by_its_scorer(tiny_cfg, tmp_path):
    import reasoning_gym

    summary = ogls_sd.trainer.train(tiny_cfg("data.task=reasoning_gym:basic_arithmetic", "data.size=20",
                                             "reward.funcs=reasoning_gym", "train.steps=2", "eval.every=0",
                                             "eval.before_after=false", *LOG_ALL))
    assert summary["reward_funcs"] == ["reward.funcs[0] reasoning_gym=1"]
    ds = reasoning_gym.create_dataset("basic_arithmetic", size=20, seed=0)
    logged = _rollouts(tmp_path / "run")
    assert len(logged) == 16  # 2 steps x 2 prompts x 4 rollouts
    for g, r in logged:
        entry = next(e for e in ds if e["question"] in g["prompt"])
        assert r["reward"] == ds.score_answer(_last_box(r["text"]), entry)
        assert r["pool"] == ("P" if r["reward"] > 0.5 else "N")


# ------------------------------------------------------------------------------ training runs
def test_cli_trains_a_non_math_task_with_user_functions(tmp_path, user_module):
    data = _jsonl(tmp_path / "words.jsonl", ROWS)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", *TINY_OVERRIDES, f"warmstart.cache_dir={tmp_path / 'ws'}", "-o", str(out),
                              f"data.task={data}", "data.reference_column=", "train.steps=2", "eval.every=0",
                              *LOG_ALL, "--reward", f"{user_module}:ends_with_answer",
                              "--reward", f"{user_module}:shelf_bonus=0.5"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_funcs"] == [f"reward.funcs[0] {user_module}:ends_with_answer=1",
                                       f"reward.funcs[1] {user_module}:shelf_bonus=0.5"]
    shelf = {r["answer"]: r["shelf"] for r in ROWS}
    logged = _rollouts(out)
    assert len(logged) == 16  # 2 steps x 2 prompts x 4 rollouts
    for g, r in logged:
        want = reference_reward(r["text"], g["answer"], shelf[g["answer"]], 0.5)
        assert abs(r["reward"] - want) < 1e-12, (r, want)
        assert r["pool"] == ("P" if r["reward"] > 0.5 else "N")
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward/mean"' in x]
    assert {"reward/fn/ends_with_answer", "reward/fn/shelf_bonus"} <= set(steps[0])
    means = [sum(r["reward"] for _, r in logged[k * 8:(k + 1) * 8]) / 8 for k in range(2)]
    assert [abs(s["reward/mean"] - m) < 1e-9 for s, m in zip(steps, means)] == [True, True]


def test_python_api_trains_on_a_dataset_with_callables_and_evaluates(tmp_path, tiny_cfg, user_module):
    import datasets

    mod = __import__(user_module)
    cfg = tiny_cfg("train.steps=2", "eval.every=0", *LOG_ALL)
    rewards = [mod.ends_with_answer, (mod.shelf_bonus, 0.25)]
    summary = train(cfg, data=datasets.Dataset.from_list(ROWS), rewards=rewards)
    assert summary["data_split"] == {"train": 10, "held_out": 2} and summary["steps"] == 2
    shelf = {r["answer"]: r["shelf"] for r in ROWS}
    assert len(_rollouts(tmp_path / "run")) == 16  # 2 steps x 2 prompts x 4 rollouts
    for g, r in _rollouts(tmp_path / "run"):
        assert abs(r["reward"] - reference_reward(r["text"], g["answer"], shelf[g["answer"]], 0.25)) < 1e-12
    res = evaluate(cfg, checkpoint=summary["checkpoint"], data=ROWS, rewards=rewards)
    assert res.n == 2 and len(res.rewards) == 2
    held = [r for r in ROWS if r["problem"] in {ex for ex in _heldout_problems(cfg)}]
    for text, reward, row in zip(res.completions, res.rewards, held):
        assert abs(reward - reference_reward(text, row["answer"], row["shelf"], 0.25)) < 1e-12
    assert res.correct == [x > 0.5 for x in res.rewards]
    with pytest.raises(ConfigError, match="data=: expected a list of dicts or a datasets.Dataset, got a file name"):
        train(cfg, data="words.jsonl")
    with pytest.raises(ValueError, match="pass model= and tokenizer= together"):
        evaluate(cfg, model=object(), data=ROWS)


def _heldout_problems(cfg):
    from ogls_sd.tasks import rows_task

    return [ex.problem for ex in rows_task(ROWS, cfg.data).examples(cfg.data.eval_size, cfg.data.seed, split="test")]


def test_python_api_takes_a_model_and_tokenizer_object(tiny_cfg, tiny_model, tok, tmp_path):
    summary = train(tiny_cfg("train.steps=1", "eval.every=0"), model=tiny_model, tokenizer=tok, data=ROWS,
                    rewards=[lambda prompts, completions, **_: [float(len(c) > 3) for c in completions]])
    assert summary["model"]["object"] is True and "warm_start" not in summary["model"]
    assert not (tmp_path / "ws").exists()  # no warm start: the given model was trained
    assert summary["reward_funcs"][0].startswith("rewards[0] ")


def test_without_reward_funcs_rewards_and_metrics_are_the_tasks(tiny_cfg, tmp_path):
    """reward.funcs empty: the task's grader decides exactly as before (arith: the integer after
    'A:'), and naming the verifier explicitly changes nothing but the per-function metric."""
    base = ["train.steps=2", "eval.every=0", "steering.no_positive=reference", *LOG_ALL]
    plain = ogls_sd.trainer.train(tiny_cfg(*base))
    logged = _rollouts(tmp_path / "run")
    task = ArithTask()
    assert all(r["reward"] == task.reward(r["text"], g["answer"]) for g, r in logged)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "reward_funcs" not in plain and not any(k.startswith("reward/fn/") for m in metrics for k in m)
    explicit = ogls_sd.trainer.train(tiny_cfg(*base, f"train.output_dir={tmp_path / 'run2'}", "reward.funcs=verifier"))
    metrics2 = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    drop = ("time/", "throughput/")
    for a, b in zip(metrics, metrics2):
        b.pop("reward/fn/verifier", None)
        assert {k: v for k, v in a.items() if not k.startswith(drop)} == {k: v for k, v in b.items() if not k.startswith(drop)}
    assert (plain["accuracy_before"], plain["accuracy_after"]) == (explicit["accuracy_before"], explicit["accuracy_after"])


# ------------------------------------------------------------------------------ README
def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README) + ":Python API", "exec"), {"__name__": "readme"})
    summary = json.loads((tmp_path / "runs" / "reverse" / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["reward_funcs"]) == 2
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith(f"{summary['accuracy_before']} {summary['accuracy_after']} ")

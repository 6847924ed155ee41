"""Rollout backends and tasks as registries (issue 21): one module registers a backend or a task,
and config validation (with a did-you-mean), the builders, evaluation and ``ogls-sd check`` read the
registry; no caller asks a task ``hasattr``."""

from __future__ import annotations

import random

import pytest

from ogls_sd.accuracy import evaluate_accuracy
from ogls_sd.config import Config, ConfigError, TemplateConfig, describe_fields
from ogls_sd.data.example import Example
from ogls_sd.registry import BACKENDS, TASKS
from ogls_sd.rewards.functions import RewardSet
from ogls_sd.rollout import Completion, HFBackend, build_backend, build_eval_backend, register_backend
from ogls_sd.tasks import ArithTask, get_task, register_task, source_error, task_templates
from ogls_sd.tasks.base import Task
from ogls_sd.templates import PromptBuilder
from ogls_sd.warmstart import plain_reference

pytestmark = pytest.mark.usefixtures("one_thread")


class EchoBackend:
    """A backend that answers every prompt with ``reply`` (token ids), recording what it was asked."""

    def __init__(self, reply: list[int], batch_size: int):
        self.reply, self.batch_size, self.calls, self.closed = reply, batch_size, [], False

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        return [Completion(list(self.reply), True) for _ in prompts]

    def sync_weights(self, model=None):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def echo(monkeypatch):
    """Register the ``echo`` backend for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(BACKENDS, "_items", dict(BACKENDS._items))
    built: list[EchoBackend] = []

    @register_backend("echo", "answers every prompt with the same ids")
    def build_echo(rollout, model, pad_id, eos_id, **_):
        built.append(EchoBackend([getattr(model, "answer_id", 7), eos_id], rollout.batch_size))
        return built[-1]

    return built


class Model:  # what the echo backend reads of a "model"
    answer_id = 7


def test_builtin_backends_and_tasks_are_registered():
    assert list(BACKENDS) == ["hf", "vllm"]
    assert {"arith", "champ", "reasoning_gym"} <= set(TASKS)
    assert TASKS["reasoning_gym"].shown == "reasoning_gym:<task>" and not TASKS["arith"].mixable


def test_a_registered_backend_is_a_choice_and_is_built(echo):
    cfg = Config.load(None, ["rollout.backend=echo", "rollout.batch_size=3", "eval.backend=echo", "eval.batch_size=5"])
    backend = build_backend(cfg.rollout, Model(), 0, 2, cfg=cfg)
    assert isinstance(backend, EchoBackend) and backend.reply == [7, 2] and backend.batch_size == 3
    ev = build_eval_backend(cfg, Model(), 0, 2)
    assert isinstance(ev, EchoBackend) and ev.batch_size == 5  # eval.batch_size
    assert cfg.rollout.backend == "echo" and cfg.rollout.batch_size == 3  # the run's section is untouched
    help_of = dict((k, h) for k, _, h in describe_fields())
    assert "echo" in help_of["rollout.backend"] and "echo" in help_of["eval.backend"]


def test_unknown_backend_is_refused_with_the_closest_name():
    for key in ("rollout.backend", "eval.backend"):
        with pytest.raises(ConfigError, match=rf"{key}: 'vlm' is not one of hf, vllm \(did you mean vllm\?\)"):
            Config.load(None, [f"{key}=vlm"])
    cfg = Config()
    object.__setattr__(cfg.rollout, "backend", "hff")  # past validation: the builder says it too
    with pytest.raises(ValueError, match=r"rollout.backend: 'hff' is not one of hf, vllm \(did you mean hf\?\)"):
        build_backend(cfg.rollout, Model(), 0, 2)


def test_the_default_eval_backend_is_exactly_the_hf_backend(tok, tiny_model):
    cfg = Config.load(None, ["eval.batch_size=3"])
    backend = build_eval_backend(cfg, tiny_model, tok.pad_token_id, tok.eos_token_id)
    assert type(backend) is HFBackend and backend.model is tiny_model and backend.batch_size == 3
    assert (backend.pad_id, backend.eos_id) == (tok.pad_token_id, tok.eos_token_id)
    task = ArithTask(digits=2)
    examples = task.examples(5, seed=0, split="test")
    pb = PromptBuilder(tok, TemplateConfig(), task.templates())
    default = evaluate_accuracy(tiny_model, tok, pb, task, examples, 10, batch_size=3)
    given = evaluate_accuracy(tiny_model, tok, pb, task, examples, 10, batch_size=99, backend=backend)
    assert (given.completions, given.correct, given.mean_length) == (default.completions, default.correct,
                                                                     default.mean_length)


def test_evaluation_generates_with_the_backend_it_is_given(tok, echo):
    task = ArithTask(digits=2)
    examples = task.examples(4, seed=0, split="test")
    pb = PromptBuilder(tok, TemplateConfig(), task.templates())
    reply = tok(f"A:{examples[0].answer}", add_special_tokens=False)["input_ids"]
    backend = EchoBackend(reply, 1)
    res = evaluate_accuracy(None, tok, pb, task, examples, 6, backend=backend)
    (prompts, params), = backend.calls
    assert prompts == [pb.student_ids(ex) for ex in examples] and params.greedy and params.max_new_tokens == 6
    assert res.correct == [ex.answer == examples[0].answer for ex in examples] and res.correct[0]
    assert res.completions[0] == f"A:{examples[0].answer}" and res.mean_length == len(reply)
    graded = evaluate_accuracy(None, tok, pb, task, examples, 6, backend=backend,
                               rewards=RewardSet([], task, threshold=0.5))
    assert graded.correct == res.correct and graded.rewards == [float(c) for c in res.correct]


class Countdown(Task):
    """A task with only what a task must have: examples and a reward."""

    name = "countdown"

    def __init__(self, start: int):
        self.start = start

    def examples(self, n, seed, split="train"):
        base = self.start + (1000 if split == "test" else 0) + seed
        return [Example(f"{base + i}-1", "", str(base + i - 1), f"cd:{split}:{i}") for i in range(n)]

    def reward(self, completion, answer):
        return 1.0 if completion.strip().endswith(answer) else 0.0


@pytest.fixture
def countdown(monkeypatch):
    monkeypatch.setattr(TASKS, "_items", dict(TASKS._items))

    @register_task("countdown", "subtract one (generated)", mixable=False)
    def build(data_cfg, argument):
        return Countdown(start=data_cfg.seed)

    @register_task("countdown_from", "subtract one from a given start", argument="<start>")
    def build_from(data_cfg, argument):
        return Countdown(start=int(argument))

    return build


def test_a_registered_task_is_a_data_task_with_defaults(countdown):
    task = get_task(Config.load(None, ["data.task=countdown", "data.seed=5"]).data)
    assert isinstance(task, Countdown) and task.start == 5
    assert get_task(Config.load(None, ["data.task=countdown_from:40"]).data).start == 40
    ex = task.examples(2, seed=0, split="test")[1]
    # the protocol's defaults stand in for every hasattr the callers used to ask
    assert task.rewards(["so 1005", "no"], ["1005", "1005"]) == [1.0, 0.0]
    assert RewardSet([], task).score(["p", "p"], ["1005", "7"], [ex, ex]) == [1.0, 0.0]
    assert plain_reference(task, ex) == ex.reference and task_templates(task) is None
    assert (task.skipped, task.duplicates, task.fingerprint, task.template_marker) == (0, 0, "", None)
    assert task.describe() == "data: built-in task countdown" and task.extract("so \\boxed{12}") == "12"
    assert task.split_sizes is None and ArithTask().split_sizes is None
    with pytest.raises(NotImplementedError, match="task countdown writes no wrong attempts"):
        task.wrong_attempt(ex, random.Random(0))
    with pytest.raises(ConfigError, match=r"data.mixture: 'countdown' \(the built-in generator\) cannot be mixed"):
        Config.load(None, ["data.mixture=countdown=1"])


def test_a_misspelt_task_is_refused_with_the_closest_name(countdown):
    with pytest.raises(ConfigError, match=r"data.task: 'countdwn' is not one of arith, champ, reasoning_gym:<task>, "
                                          r"countdown, countdown_from:<start> \(did you mean countdown\?\)"):
        Config.load(None, ["data.task=countdwn"])
    with pytest.raises(ConfigError, match=r"data.task: 'reasoning-gym:gsm' .*\(did you mean reasoning_gym:<task>\?\)"):
        Config.load(None, ["data.task=reasoning-gym:gsm"])
    with pytest.raises(ConfigError, match=r"data.mixture: entry 'arth=1': 'arth' is not one of .*\(did you mean arith\?\)"):
        Config.load(None, ["data.mixture=arth=1"])
    assert source_error("reasoning_gym:") == "data.task: reasoning_gym: needs reasoning_gym:<task> (e.g. reasoning_gym:task)"
    assert source_error("countdown:3") is not None  # not a family: no argument
    for fine in ("arith", "countdown_from:3", "reasoning_gym:gsm_symbolic", "data/x.jsonl", "owner/name", "gsm8k"):
        assert source_error(fine) is None, fine


def test_check_reports_the_task_line(tmp_path, countdown):
    from ogls_sd.check import check

    lines = check(Config.load(None, ["data.task=countdown"]), model=False)
    assert "data: built-in task countdown" in lines
    p = tmp_path / "d.jsonl"
    p.write_text("".join(f'{{"problem": "{i}+1", "answer": "{i + 1}"}}\n' for i in range(10)))
    lines = check(Config.load(None, [f"data.task={p}", "data.eval_size=2"]), model=False)
    assert "data: 10 rows -> 8 training, 2 held out" in lines  # once, not 'data: data: ...'
    assert get_task(Config.load(None, [f"data.task={p}", "data.eval_size=2"]).data).split_sizes == (8, 2)


def test_arith_task_supplies_its_templates_and_plain_reference():
    task = ArithTask(digits=2, style="templated")
    ex = task.examples(1, seed=0)[0]
    assert task_templates(task) is task.templates() and task.templates()["student"] == "{problem}"
    assert plain_reference(task, ex) == task.solution([int(x) for x in ex.problem.split("+")]) != ex.reference
    assert task.rewards([ex.reference, "A:0"], [ex.answer, ex.answer]) == [1.0, 0.0]


def test_eval_harness_and_api_generate_with_eval_backend(tmp_path, tok, tiny_model, echo, monkeypatch):
    import json

    import ogls_sd
    from ogls_sd.eval_harness import BenchmarkSpec, evaluate_benchmarks

    monkeypatch.setattr(HFBackend, "generate", lambda *a, **k: pytest.fail("the hf backend generated"))
    cfg = Config.load(None, ["eval.backend=echo", "data.eval_size=3", "eval.batch_size=2"])
    task = ArithTask()
    res = evaluate_benchmarks(cfg, tiny_model, tok, task, task.templates(), [BenchmarkSpec.parse("task")], 2, 0,
                              tmp_path / "eval", {"name": "tiny"})
    assert res["backend"] == "echo" and json.loads((tmp_path / "eval" / "results.json").read_text())["backend"] == "echo"
    assert len(echo) == 1 and echo[0].closed and echo[0].batch_size == 2  # eval.batch_size; closed afterwards
    (prompts, _), = echo[0].calls
    assert len(prompts) == 6  # 3 problems x k=2
    reply = tok.decode([7], skip_special_tokens=True)
    gens = [json.loads(x) for x in (tmp_path / "eval" / "generations_arith.jsonl").read_text().splitlines()]
    assert len(gens) == 6 and {g["completion"] for g in gens} == {reply}
    result = ogls_sd.evaluate(cfg, model=tiny_model, tokenizer=tok)
    assert len(echo) == 2 and echo[1].closed and result.completions == [reply] * 3 and result.n == 3


def test_task_options_reach_the_reasoning_gym_config_and_bad_ones_are_refused():
    reasoning_gym = pytest.importorskip("reasoning_gym")
    from ogls_sd.data.files import DataError
    from ogls_sd.tasks.base import parse_task_options

    assert parse_task_options(["min_digits=1", "ratio=0.5", "flag=false", "ops=+-*", "name=x=y"]) == {
        "min_digits": 1, "ratio": 0.5, "flag": False, "ops": "+-*", "name": "x=y"}
    huge = "9" * 5000  # YAML reads it as an int Python refuses to build: kept as text, as config overrides do
    assert parse_task_options([f"n={huge}", "m=a: b: c"]) == {"n": huge, "m": "a: b: c"}
    opts = "min_terms=2,max_terms=2,min_digits=1,max_digits=1"
    cfg = Config.load(None, ["data.task=reasoning_gym:chain_sum", f"data.task_options={opts}", "data.size=40"])
    assert cfg.data.task_options == opts.split(",")
    problems = [ex.problem for ex in get_task(cfg.data).examples(10, seed=0, split="train")]
    theirs = reasoning_gym.create_dataset("chain_sum", size=40, seed=0, min_terms=2, max_terms=2, min_digits=1,
                                          max_digits=1)
    assert set(problems) <= {e["question"] for e in theirs}  # the options reached reasoning-gym's config
    assert all(e["metadata"]["num_terms"] == 2 and e["metadata"]["num_digits"] == 1 for e in theirs)
    wide = Config.load(None, ["data.task=reasoning_gym:chain_sum", "data.size=40"])
    assert set(problems).isdisjoint(ex.problem for ex in get_task(wide.data).examples(10, seed=0, split="train"))
    for bad, msg in ((["data.task=arith", "data.task_options=a=1"],
                      r"data.task_options: data.task='arith' takes no options \(tasks that do: reasoning_gym:<task>\)"),
                     (["data.task=reasoning_gym:chain_sum", "data.task_options=min_digits"],
                      r"data.task_options\[0\]: expected KEY=VALUE, got 'min_digits'"),
                     (["data.task=reasoning_gym:chain_sum", "data.task_options=a=1,a=2"],
                      r"data.task_options\[1\]: 'a' is given twice"),
                     (["data.mixture=reasoning_gym:chain_sum=1", "data.task_options=a=1"],
                      r"data.task_options: options apply to data.task alone")):
        with pytest.raises(ConfigError, match=msg):
            Config.load(None, bad)
    for opts, msg in (("bogus=1", "unexpected keyword argument 'bogus'"), ("min_digits=3,max_digits=1", "max_digits")):
        cfg = Config.load(None, ["data.task=reasoning_gym:chain_sum", f"data.task_options={opts}", "data.size=40"])
        with pytest.raises(DataError, match=rf"reasoning_gym:chain_sum: data.task_options .*{msg}"):
            get_task(cfg.data)

"""The templated arith variant (data.arith_style=templated) and the warm-start mix for each format."""

import random

import pytest

from ogls_sd.config import Config
from ogls_sd.tasks import get_task, task_templates
from ogls_sd.tasks.arith import TEMPLATE_MARKER, ArithTask, templated_solution
from ogls_sd.templates import PromptBuilder
from ogls_sd.tiny import char_tokenizer
from ogls_sd.warmstart import cache_key, sft_pairs


def test_templated_reference_contains_template_and_plain_reference_does_not():
    t = ArithTask(style="templated")
    assert templated_solution("7+8=15 4+6+1=11 3+5+1=9 A:915") == (
        "7+8=15 chk:15-8=7 ok 4+6+1=11 chk:11-6-1=4 ok 3+5+1=9 chk:9-5-1=3 ok A:915")
    for ex in t.examples(100, seed=3):
        plain = t.plain_reference(ex)
        assert ex.reference.count(TEMPLATE_MARKER) == 3  # one check per column step
        assert TEMPLATE_MARKER not in plain
        assert plain == ArithTask.solution([int(x) for x in ex.problem.split("+")])
        assert t.reward(ex.reference, ex.answer) == 1.0 and t.reward(plain, ex.answer) == 1.0
        # a plain solution fits the rollout limit, a copied template is cut before its answer
        assert len(plain) + 1 <= t.plain_max_tokens() < len(ex.reference)
        assert t.reward(ex.reference[: t.plain_max_tokens()], ex.answer) == 0.0
        assert TEMPLATE_MARKER not in t.wrong_attempt(ex, random.Random(0))


def test_plain_style_is_unchanged_and_config_selects_the_style():
    p = ArithTask()
    ex = p.examples(1, seed=0)[0]
    assert ex.reference == p.plain_reference(ex) and TEMPLATE_MARKER not in ex.reference
    assert get_task(Config().data).style == "plain"
    assert get_task(Config.load(None, ["data.arith_style=templated"]).data).style == "templated"
    with pytest.raises(Exception):
        Config.load(None, ["data.arith_style=fancy"])
    # the warm-start cache of the plain style is keyed as before; templated gets its own
    assert cache_key(Config()) != cache_key(Config.load(None, ["data.arith_style=templated"]))


@pytest.mark.parametrize("style", ["plain", "templated"])
def test_warmstart_pairs_for_each_format(style):
    cfg = Config.load(None, [f"data.arith_style={style}"])
    task = get_task(cfg.data)
    tok = char_tokenizer()
    prompts = PromptBuilder(tok, cfg.templates, task_templates(task))
    exs = task.examples(200, seed=0)
    pairs = list(sft_pairs(task, prompts, exs, cfg, random.Random(0)))
    kinds = {k for k, _, _ in pairs}
    assert kinds == {"student", "privileged", "context"}
    for (kind, p, t), ex in zip(pairs, exs):
        assert t[-1] == prompts.eos_id
        target = tok.decode(t[:-1])
        prompt = tok.decode(p)
        plain = task.plain_reference(ex)
        if kind == "student":
            assert p == prompts.student_ids(ex) and target == plain
        elif kind == "privileged":
            # the teacher reading the (templated) reference learns to reproduce it
            assert p == prompts.teacher_ids(ex) and target == ex.reference
            assert ex.reference in prompt
        else:
            assert "Try:" in prompt and target == plain  # earlier-attempt format -> plain solution
            attempt = prompt.split("Try:", 1)[1]
            assert TEMPLATE_MARKER not in attempt  # right and wrong attempts are plain
        if style == "templated":
            assert (TEMPLATE_MARKER in target) == (kind == "privileged")
    # both right and wrong attempts appear in the context format
    rewards = {task.reward(tok.decode(p).split("Try:", 1)[1], ex.answer) for (k, p, _), ex in zip(pairs, exs) if k == "context"}
    assert rewards == {0.0, 1.0}


def test_no_positive_reference_can_use_the_plain_reference(tiny_model, tok):
    """steering.fallback_reference=plain puts the student-style reference into the positive context."""
    from ogls_sd.algorithms import Group, Rollout, StepBatch, build_algorithm
    from ogls_sd.teacher import Teacher

    for which, expect_marker in (("plain", False), ("reference", True)):
        cfg = Config.load(None, ["data.arith_style=templated", "steering.no_positive=reference",
                                 f"steering.fallback_reference={which}"])
        task = get_task(cfg.data)
        prompts = PromptBuilder(tok, cfg.templates, task_templates(task))
        algo = build_algorithm(cfg, tiny_model, Teacher(tiny_model, "live", 0.999), prompts)
        ex = task.examples(1, seed=0)[0]
        g = Group(ex, prompts.student_ids(ex), prompts.teacher_ids(ex), rollouts=[0, 1])
        wrong = prompts.text_ids(task.wrong_attempt(ex, random.Random(0)))
        batch = StepBatch([g], [Rollout(0, wrong, True, 0.0), Rollout(0, wrong, True, 0.0)])
        plan = algo.plan(batch, 0)
        assert plan.metrics["no_positive/reference"] == 1.0
        pos = tok.decode(plan.targets[0].pos[0])
        assert (TEMPLATE_MARKER in pos) == expect_marker
        assert task.plain_reference(ex) in pos or expect_marker

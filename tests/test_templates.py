import pytest

from ogls_sd.config import TemplateConfig
from ogls_sd.data.example import Example
from ogls_sd.tasks.arith import TEMPLATES
from ogls_sd.templates import PromptBuilder, join_completion

EX = Example("12+34", "2+4=6 1+3=4 A:46", "46")


def test_teacher_sequence_is_teacher_prompt_plus_exact_student_ids(tok):
    pb = PromptBuilder(tok, TemplateConfig(), TEMPLATES)
    completion = tok("2+4=6 1+3=4 A:46", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    s_seq, s0 = join_completion(pb.student_ids(EX), completion)
    t_seq, t0 = join_completion(pb.teacher_ids(EX), completion)
    assert s_seq[s0:] == t_seq[t0:] == completion
    assert pb.teacher_ids(EX) != pb.student_ids(EX)
    # prompts are left intact: no padding, special tokens kept
    assert pb.student_ids(EX)[0] == tok.convert_tokens_to_ids("<|user|>")


def test_context_splices_attempt_ids_without_reencoding(tok):
    pb = PromptBuilder(tok, TemplateConfig(), TEMPLATES)
    # ids that would not survive decode+encode: a special token inside the attempt, then EOS
    attempt = [tok.convert_tokens_to_ids(c) for c in "A:4"] + [tok.convert_tokens_to_ids("<|user|>"), tok.eos_token_id]
    ids = pb.context_ids(EX, attempt, max_tokens=100, strip_think=True)
    core = attempt[:-1]  # trailing EOS removed
    assert any(ids[i : i + len(core)] == core for i in range(len(ids)))
    assert len(pb.context_ids(EX, attempt * 20, max_tokens=3)) == len(pb.context_ids(EX, attempt[:3], max_tokens=3))


def test_think_blocks_are_stripped_on_ids(tok):
    pb = PromptBuilder(tok, TemplateConfig(), TEMPLATES)
    o, c = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    x = tok.convert_tokens_to_ids("x")
    y = tok.convert_tokens_to_ids("y")
    assert pb.clean_attempt([o, x, x, c, y], 10) == [y]
    assert pb.clean_attempt([o, x, x, c, y], 10, strip_think=False) == [o, x, x, c, y]


def test_thinking_flags_change_student_and_teacher_prompts_independently(tok):
    base = PromptBuilder(tok, TemplateConfig(), TEMPLATES)
    s_on = PromptBuilder(tok, TemplateConfig(student_thinking=True), TEMPLATES)
    t_on = PromptBuilder(tok, TemplateConfig(teacher_thinking=True), TEMPLATES)
    assert s_on.student_ids(EX) != base.student_ids(EX) and s_on.teacher_ids(EX) == base.teacher_ids(EX)
    assert t_on.teacher_ids(EX) != base.teacher_ids(EX) and t_on.student_ids(EX) == base.student_ids(EX)
    think_empty = tok("<think></think>", add_special_tokens=False)["input_ids"]
    assert base.student_ids(EX)[-2:] == think_empty


def test_task_templates_yield_to_explicit_ones(tok):
    pb = PromptBuilder(tok, TemplateConfig(teacher="{problem} REF {reference}"), TEMPLATES)
    assert "REF" in tok.decode(pb.teacher_ids(EX))
    assert "Ref:" in tok.decode(PromptBuilder(tok, TemplateConfig(), TEMPLATES).teacher_ids(EX))


def test_missing_chat_template_is_a_clear_error(tok):
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        PromptBuilder(tok, TemplateConfig(), TEMPLATES)

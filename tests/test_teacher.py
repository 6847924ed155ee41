"""Teacher weights (method.md §1): EMA update and checkpoint round trip; the frozen teacher stays
the initial policy under LoRA (adapter disabled, no copy) and under full fine-tuning (a copy)."""

import copy

import pytest
import torch

from ogls_sd.checkpoint import load_ema, save_checkpoint
from ogls_sd.modeling import SeqBatch, lm_head
from ogls_sd.teacher import Teacher

from test_algorithms import make_batch, setup


def test_ema_update_matches_naive_formula(tiny_model):
    d = 0.9
    teacher = Teacher(tiny_model, "ema", ema_decay=d)
    phi = {k: v.clone().double() for k, v in teacher.copy.named_parameters()}
    for step in range(3):
        with torch.no_grad():  # stand-in for an optimizer step
            for p in tiny_model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        theta = {k: v.detach().clone().double() for k, v in tiny_model.named_parameters()}
        teacher.update()
        phi = {k: d * phi[k] + (1 - d) * theta[k] for k in phi}
        for k, v in teacher.copy.named_parameters():
            assert torch.allclose(v.double(), phi[k], rtol=1e-6, atol=1e-7), (step, k)
            assert not v.requires_grad
    assert not torch.equal(teacher.copy.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight)


def test_ema_state_round_trips_through_a_checkpoint(tmp_path, tok, tiny_model):
    teacher = Teacher(tiny_model, "ema", ema_decay=0.5)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.mul_(1.5)
    teacher.update()
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    ckpt = save_checkpoint(tmp_path, 3, tiny_model, tok, opt, None, teacher)
    assert (ckpt / "teacher_ema.safetensors").is_file()
    sd = load_ema(ckpt)
    want = teacher.copy.state_dict()
    assert set(sd) == set(want)
    for k in want:
        assert torch.equal(sd[k], want[k]), k
    # restore into a fresh teacher of a fresh policy: same EMA weights, policy untouched
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    t2 = Teacher(other, "ema", ema_decay=0.5)
    t2.load_state_dict(sd)
    for (k, a), b in zip(t2.copy.state_dict().items(), want.values()):
        assert torch.equal(a, b), k
    assert all(torch.count_nonzero(p) == 0 for p in other.parameters())
    # other kinds write no EMA file
    ck2 = save_checkpoint(tmp_path / "frozen", 1, tiny_model, tok, opt, None, Teacher(tiny_model, "frozen"))
    assert not (ck2 / "teacher_ema.safetensors").exists() and load_ema(ck2) is None


def test_ema_checkpoint_with_tied_embeddings(tmp_path, tok):
    """safetensors refuses tensors that share memory: the EMA state of a model with tied input and
    output embeddings (Qwen3-1.7B, for one) must still save and load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    teacher = Teacher(model, "ema", ema_decay=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = save_checkpoint(tmp_path, 1, model, tok, opt, None, teacher)
    sd = load_ema(ckpt)
    t2 = Teacher(copy.deepcopy(model), "ema", ema_decay=0.9)
    t2.load_state_dict(sd)
    assert torch.equal(t2.copy.lm_head.weight, teacher.copy.lm_head.weight)


def _teacher_outputs(teacher, batch, pad_id):
    """Teacher hidden states and lm head on the privileged prompts of every rollout."""
    seqs = [(batch.groups[r.group].teacher_prompt + r.ids, len(batch.groups[r.group].teacher_prompt)) for r in batch.rollouts]
    sb = SeqBatch([s for s, _ in seqs], [st for _, st in seqs], [len(r.ids) for r in batch.rollouts])
    w, b = teacher.head()
    return teacher.hidden(sb, pad_id).clone(), w.clone()


def _train_steps(model, algo, batch, n=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(n):
        plan = algo.plan(batch, step)
        for micro in plan.micro_batches(4):
            loss, _ = algo.loss(plan, micro)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        algo.teacher.update()


def test_frozen_teacher_unchanged_under_full_finetuning(tok, tiny_model):
    initial = copy.deepcopy(tiny_model)
    cfg, pb, teacher, algo = setup(tok, tiny_model, "train.algorithm=opsd")
    assert teacher.copy is not None and all(not p.requires_grad for p in teacher.copy.parameters())
    batch = make_batch(tok, pb, [[1, 0, 0], [0, 1, 0]])
    h0, w0 = _teacher_outputs(teacher, batch, pb.pad_id)
    _train_steps(tiny_model, algo, batch)
    h1, w1 = _teacher_outputs(teacher, batch, pb.pad_id)
    assert torch.equal(h0, h1) and torch.equal(w0, w1)
    for (k, a), b in zip(teacher.copy.state_dict().items(), initial.state_dict().values()):
        assert torch.equal(a, b), k
    # ... while the policy moved
    assert not torch.equal(lm_head(tiny_model)[0], lm_head(initial)[0])


def test_frozen_teacher_is_the_adapter_disabled_policy_under_lora(tok, tiny_model):
    from peft import LoraConfig, get_peft_model

    from ogls_sd.algorithms import build_algorithm
    from ogls_sd.config import Config
    from ogls_sd.tasks.arith import TEMPLATES
    from ogls_sd.templates import PromptBuilder

    initial = copy.deepcopy(tiny_model)
    cfg = Config.load(None, ["train.algorithm=opsd", "model.lora=true", "model.lora_target_modules=q_proj,v_proj",
                             "model.lora_r=4", "model.lora_alpha=8"])
    policy = get_peft_model(tiny_model, LoraConfig(r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha,
                                                   target_modules=list(cfg.model.lora_target_modules), task_type="CAUSAL_LM"))
    teacher = Teacher(policy, cfg.teacher.resolve(cfg.train.algorithm), cfg.teacher.resolve_ema_decay(cfg.train.algorithm), lora=cfg.model.lora)
    assert teacher.kind == "frozen" and teacher.copy is None  # no second copy in memory
    pb = PromptBuilder(tok, cfg.templates, TEMPLATES)
    algo = build_algorithm(cfg, policy, teacher, pb)
    batch = make_batch(tok, pb, [[1, 0, 0], [0, 1, 0]])
    h0, w0 = _teacher_outputs(teacher, batch, pb.pad_id)
    # before training the adapter is a no-op (B = 0): the teacher is the initial model
    h_init, _ = _teacher_outputs(Teacher(initial, "live"), batch, pb.pad_id)
    assert torch.allclose(h0, h_init, atol=1e-6)
    _train_steps(policy, algo, batch)
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(p) > 0 for p in lora_b)  # the adapter trained
    h1, w1 = _teacher_outputs(teacher, batch, pb.pad_id)
    assert torch.allclose(h0, h1, atol=1e-6) and torch.equal(w0, w1)
    # the student (adapter enabled) differs from the teacher now
    h_student, _ = _teacher_outputs(Teacher(policy, "live"), batch, pb.pad_id)
    assert not torch.allclose(h_student, h1, atol=1e-4)


def test_ema_with_lora_needs_a_peft_model(tiny_model):
    with pytest.raises(ValueError, match="ema"):
        Teacher(tiny_model, "ema", lora=True)  # no adapter to average


@pytest.mark.parametrize("kind,lora,cls_name,has_copy,has_state", [
    ("live", False, "LiveTeacher", False, False), ("live", True, "LiveTeacher", False, False),
    ("frozen", False, "FrozenCopyTeacher", True, False), ("frozen", True, "AdapterOffTeacher", False, False),
    ("ema", False, "EMACopyTeacher", True, True), ("ema", True, "EMAAdapterTeacher", False, True),
])
def test_one_class_per_teacher_kind(kind, lora, cls_name, has_copy, has_state):
    """teacher_class is the one place that reads teacher.kind; each kind is a class behind one interface."""
    import ogls_sd.teacher as T

    cls = T.teacher_class(kind, lora)
    assert cls.__name__ == cls_name and issubclass(cls, T.Teacher) and cls.kind == kind
    assert cls.has_state == has_state
    for method in ("module", "hidden", "head", "update", "state_dict", "load_state_dict"):
        assert callable(getattr(cls, method))
    if not lora:
        model = torch.nn.Linear(2, 2)
        t = T.Teacher(model, kind, 0.5)
        assert type(t) is cls and (t.copy is not None) == has_copy and (t.state_dict() is not None) == has_state
        with t.module() as m:
            assert (m is model) == (kind == "live")


def test_unknown_teacher_kind_names_the_key():
    import ogls_sd.teacher as T

    with pytest.raises(ValueError, match="teacher.kind: 'stale' not in frozen, ema, live"):
        T.Teacher(torch.nn.Linear(2, 2), "stale")

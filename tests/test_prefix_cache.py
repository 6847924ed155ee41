"""Prefix-shared teacher passes (``steering.prefix_cache_max_tokens``, ogls_sd.modeling
``prefix_shared_hidden``): every distinct prompt + context prefix is encoded once and its key/value
cache reused for every target scored under it. Pinned to the unshared passes (cap 0: one full
forward per (context, target) pair) in float64: raw hidden states on random batches with prefixes
of different lengths (Llama and Qwen2), OGLS-SD losses and gradients for context and global pooling,
with a frozen copy, the live policy and LoRA (adapter-off frozen, live, EMA adapter) teachers."""

import random

import pytest
import torch

import ogls_sd.teacher as teacher_mod
from ogls_sd.modeling import SeqBatch, completion_hidden, prefix_shared_hidden, repeats_a_prefix
from ogls_sd.teacher import Teacher
from ogls_sd.tiny import tiny_llama
from test_algorithms import make_batch, setup

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_qwen2(vocab: int, pad_id: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, pad_token_id=pad_id, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg)


def _model(kind: str, tok):
    if kind == "qwen2":
        return _tiny_qwen2(len(tok), tok.pad_token_id).double().eval()
    torch.manual_seed(0)
    return tiny_llama(len(tok), hidden=32, layers=2, heads=2, intermediate=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).double().eval()


def _random_batch(vocab: int, seed: int, n_prefixes: int = 4, n_seqs: int = 13) -> SeqBatch:
    """Prefixes of 1..15 tokens, each continued by several completions of 1..9 tokens, of which a
    random number (0 included) are kept."""
    rng = random.Random(seed)
    pre = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 15))] for _ in range(n_prefixes)]
    seqs, starts, lens = [], [], []
    for _ in range(n_seqs):
        p = pre[rng.randrange(n_prefixes)]
        c = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))]
        seqs.append(p + c)
        starts.append(len(p))
        lens.append(rng.randint(0, len(c)))
    return SeqBatch(seqs, starts, lens)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("cap", [1, 40, 10**6])
def test_prefix_shared_hidden_equals_one_forward_per_sequence(tok, arch, cap):
    model = _model(arch, tok)
    for seed in range(3):
        sb = _random_batch(len(tok), seed)
        assert repeats_a_prefix(sb)
        with torch.no_grad():
            ref = completion_hidden(model, sb, tok.pad_token_id, micro_batch=5)
            got = prefix_shared_hidden(model, sb, tok.pad_token_id, cap)
        assert got.shape == ref.shape == (sb.rows, 32)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_prefix_shared_hidden_depends_on_the_prefix(tok):
    """Not vacuous: the same completion after two different prefixes gets different states."""
    model = _model("llama", tok)
    c = [5, 6, 7, 8]
    sb = SeqBatch([[9, 10, 11] + c, [12, 13] + c, [12, 13] + c], [3, 2, 2], [4, 4, 4])
    with torch.no_grad():
        h = prefix_shared_hidden(model, sb, tok.pad_token_id, 10**6)
    assert (h[:4] - h[4:8]).abs().max() > 1e-3
    torch.testing.assert_close(h[4:8], h[8:12], rtol=0, atol=1e-12)


class _Counter:
    """Counts calls of ``teacher.prefix_shared_hidden`` (proves the shared path ran)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        inner = teacher_mod.prefix_shared_hidden

        def counted(*a, **kw):
            self.calls += 1
            return inner(*a, **kw)

        monkeypatch.setattr(teacher_mod, "prefix_shared_hidden", counted)


def _loss_and_grads(tok, model, overrides, teacher_kind=None, lora=False):
    cfg, pb, teacher, algo = setup(tok, model, *overrides)
    if teacher_kind is not None:
        teacher = Teacher(model, teacher_kind, 0.5, lora=lora)
        algo.teacher = teacher
    batch = make_batch(tok, pb, [[1, 1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]])
    plan = algo.plan(batch, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    total, grads = 0.0, [torch.zeros_like(p) for p in params]
    for micro in plan.micro_batches(4):
        loss, _ = algo.loss(plan, micro)
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [a + (g if g is not None else 0) for a, g in zip(grads, gs)]
        total += float(loss.detach())
    return total, grads


def _compare(tok, make_model, overrides, monkeypatch, **kw):
    ref = _loss_and_grads(tok, make_model(), overrides + ["steering.prefix_cache_max_tokens=0"], **kw)
    count = _Counter(monkeypatch)
    for cap in (50, 100000):  # several passes per call, and one
        count.calls = 0
        got = _loss_and_grads(tok, make_model(), overrides + [f"steering.prefix_cache_max_tokens={cap}"], **kw)
        assert count.calls > 0
        assert ref[0] != 0.0 and got[0] == pytest.approx(ref[0], rel=1e-9, abs=1e-12)
        assert any(g.abs().max() > 0 for g in ref[1])
        for a, b in zip(got[1], ref[1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


POOLINGS = {
    "context": ["steering.pooling=context", "steering.max_contexts=3"],
    "context_privileged": ["steering.pooling=context", "steering.anchor=privileged", "steering.negative_branch=log_mean"],
    "global": ["steering.pooling=global", "steering.distill_on=all"],
}


@pytest.mark.parametrize("pooling", list(POOLINGS))
@pytest.mark.parametrize("kind", ["frozen", "live"])
def test_ogls_loss_and_gradients_equal_the_unshared_passes(tok, tiny_model, pooling, kind, monkeypatch):
    state = {k: v.double() for k, v in tiny_model.state_dict().items()}

    def make():
        m = tiny_model.__class__(tiny_model.config).double()
        m.load_state_dict(state)
        m.config.attention_dropout = 0.0
        return m

    over = ["train.algorithm=ogls_sd", f"teacher.kind={kind}", "steering.strength=1.5", *POOLINGS[pooling]]
    _compare(tok, make, over, monkeypatch, teacher_kind=kind)
    # the live anchor on the student prompt is then read off the student's own pass (no teacher pass)
    algo = setup(tok, make(), *over)[3]
    assert algo.anchor_from_student == (kind == "live")
    assert not setup(tok, make(), *over, "steering.prefix_cache_max_tokens=0")[3].anchor_from_student


@pytest.mark.parametrize("kind", ["frozen", "live", "ema"])
@pytest.mark.parametrize("pooling", ["context", "global"])
def test_lora_teachers_share_prefixes_on_their_own_weights(tok, tiny_model, kind, pooling, monkeypatch):
    """The prefix cache and the targets' passes run on the same teacher module: the adapter-off
    base (frozen), the adapter (live) or the swapped-in EMA adapter (ema)."""
    from peft import LoraConfig, get_peft_model

    state = {k: v.double() for k, v in tiny_model.state_dict().items()}

    def make():
        m = tiny_model.__class__(tiny_model.config).double()
        m.load_state_dict(state)
        p = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                         task_type="CAUSAL_LM"))
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, w in p.named_parameters():
                if "lora_" in n:  # B = 0 at init would make the adapter invisible
                    w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.3)
        return p

    over = ["train.algorithm=ogls_sd", "steering.strength=1.5", f"steering.pooling={pooling}", "steering.distill_on=all"]
    _compare(tok, make, over, monkeypatch, teacher_kind=kind, lora=True)
    # and the adapter-off teacher really is the base model: its shared passes differ from the adapter's
    m = make()
    sb = SeqBatch([[9, 10, 11, 5, 6], [9, 10, 11, 7, 8]], [3, 3], [2, 2])
    off = Teacher(m, "frozen", lora=True).hidden(sb, tok.pad_token_id, 4, prefix_cache_tokens=1000)
    on = Teacher(m, "live", lora=True).hidden(sb, tok.pad_token_id, 4, prefix_cache_tokens=1000)
    with m.disable_adapter(), torch.no_grad():
        base = completion_hidden(m.eval(), sb, tok.pad_token_id)
    torch.testing.assert_close(off, base, rtol=1e-9, atol=1e-12)
    assert (off - on).abs().max() > 1e-4


FSDP_CASES = {
    "live": "ogls_sd",
    "frozen_copy": "ogls_sd,teacher.kind=frozen,steering.pooling=global,steering.distill_on=all",
    "lora_frozen": "ogls_sd,model.lora=true,model.lora_r=4,model.lora_alpha=8,teacher.kind=frozen",
}


def test_fsdp_shared_passes_take_the_unshared_single_process_step(tmp_path):
    """Two FSDP2 ranks (gloo, torchrun) with prefix-shared passes on the gathered (sharded at rest)
    policy / teacher copy take the step of one process without sharing (float64)."""
    from safetensors.torch import load_file

    from test_data_parallel import check_ranks_report_the_single_step, run_worker_pair

    cases = {}
    for name, spec in FSDP_CASES.items():
        cases[f"{name}_shared"] = spec + ",steering.prefix_cache_max_tokens=60"
        cases[f"{name}_unshared"] = spec + ",steering.prefix_cache_max_tokens=0"
    out = run_worker_pair(tmp_path, cases, "--fsdp")
    for name in FSDP_CASES:
        check_ranks_report_the_single_step(out / f"{name}_shared", "fsdp2", name)  # a step with a gradient
        ref = load_file(out / f"{name}_unshared" / "ws1_rank0.safetensors")
        single = load_file(out / f"{name}_shared" / "ws1_rank0.safetensors")
        got = load_file(out / f"{name}_shared" / "fsdp2_rank0.safetensors")
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-10, msg=lambda m: f"{name} {k}: {m}")
            torch.testing.assert_close(single[k], ref[k], rtol=1e-9, atol=1e-10, msg=lambda m: f"{name} {k}: {m}")


@pytest.mark.parametrize("cap", [1, 30, 90])
def test_every_pass_respects_the_token_cap(tok, cap, monkeypatch):
    """A pass holds at most ``cap`` cached + new tokens (``rows × (prefix width + suffix width)``),
    or a single sequence; the prefix cache of a chunk at most ``cap`` tokens (or one prefix)."""
    import ogls_sd.modeling as modeling

    seen = []
    inner_suffix, inner_encode = modeling._suffix_pass, modeling._encode_prefixes

    def suffix(backbone, pc, rows, suffixes, pad_id, dev):
        seen.append(("pass", len(rows), pc.mask.shape[1] + max(len(s) for s in suffixes)))
        return inner_suffix(backbone, pc, rows, suffixes, pad_id, dev)

    def encode(backbone, prefixes, pad_id, max_tokens, dev):
        seen.append(("cache", len(prefixes), max(len(p) for p in prefixes)))
        return inner_encode(backbone, prefixes, pad_id, max_tokens, dev)

    monkeypatch.setattr(modeling, "_suffix_pass", suffix)
    monkeypatch.setattr(modeling, "_encode_prefixes", encode)
    model = _model("llama", tok)
    sb = _random_batch(len(tok), 7, n_prefixes=5, n_seqs=20)
    with torch.no_grad():
        ref = completion_hidden(model, sb, tok.pad_token_id)
        got = prefix_shared_hidden(model, sb, tok.pad_token_id, cap)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    assert seen and all(n == 1 or n * width <= cap for _, n, width in seen), seen
    # every kept sequence is scored once; those without a prefix token to cache (start 1) go the plain way
    assert sum(n for kind, n, _ in seen if kind == "pass") == sum(1 for n, st in zip(sb.lengths, sb.starts) if n and st > 1)

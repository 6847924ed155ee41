"""vLLM rollout backend without vLLM: fake engines that mimic vLLM's API and result types.

``FakeLLM`` stands for ``vllm.LLM`` (generate / apply_model / sleep / wake_up / reset_prefix_cache,
``llm_engine.model_config.max_model_len``) and returns look-alikes of ``RequestOutput`` /
``CompletionOutput`` / ``Logprob``; ``FakeVLLMServer`` is a tiny HTTP server on 127.0.0.1 speaking
the parts of vLLM's OpenAI-compatible API the backend uses. Both sample from a real tiny HF model,
so the log-probs they return can be checked against a teacher-forced forward pass: that check
fails if a single token id is shifted, dropped or re-tokenised.
"""

from __future__ import annotations

import copy
import http.server
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ogls_sd.config import Config
from ogls_sd.rollout import Completion, HFBackend, PromptTooLong, RolloutTimeout, SamplingParams, build_backend
from ogls_sd.rollout.vllm_backend import (
    ColocateEngine,
    ServerEngine,
    VLLMBackend,
    build_requests,
    call_with_timeout,
    completion_from_choice,
    completion_from_output,
    export_adapter,
    full_weights,
    hf_to_vllm_name,
    to_completion_payload,
    to_sampling_params,
)
from ogls_sd.tiny import char_tokenizer, tiny_llama

EOS = 1

# ----------------------------------------------------------------------------- vLLM look-alikes


@dataclass
class FakeSamplingParams:  # the fields of vllm.SamplingParams the backend sets
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    seed: int | None = None
    logprobs: int | None = None
    stop_token_ids: list | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True


@dataclass
class FakeLogprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FakeCompletionOutput:  # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class FakeRequestOutput:  # vllm.outputs.RequestOutput
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    prompt_logprobs: list | None
    outputs: list
    finished: bool = True


@dataclass(frozen=True)
class FakeLoRARequest:  # vllm.lora.request.LoRARequest
    lora_name: str
    lora_int_id: int
    lora_path: str = ""


@torch.no_grad()
def fake_sample(model, prompt: list[int], sp, max_model_len: int) -> list[FakeCompletionOutput]:
    """vLLM-like sampling: child i uses seed + i; raw log-probs of the sampled tokens; stops at a
    stop token id (kept in the ids) or at max_tokens / max_model_len."""
    outs = []
    for i in range(sp.n):
        g = torch.Generator().manual_seed((sp.seed or 0) + i)
        ids, toks, lps, finish, stop = list(prompt), [], [], "length", None
        for _ in range(sp.max_tokens):
            if len(ids) >= max_model_len:
                break
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            raw = torch.log_softmax(logits, -1)
            if sp.temperature == 0:
                t = int(logits.argmax())
            else:
                z = logits / sp.temperature
                if sp.top_k and sp.top_k > 0:
                    z[z < z.topk(sp.top_k).values[-1]] = -float("inf")
                t = int(torch.multinomial(torch.softmax(z, -1), 1, generator=g))
            toks.append(t)
            lps.append({t: FakeLogprob(float(raw[t]), rank=1)})
            ids.append(t)
            if t in (sp.stop_token_ids or []):
                finish, stop = "stop", t
                break
        outs.append(FakeCompletionOutput(i, "", toks, sum(d[t].logprob for d, t in zip(lps, toks)), lps, finish, stop))
    return outs


class FakeVllmModel(torch.nn.Module):
    """What ``apply_model`` hands out: a model whose ``load_weights`` takes HF checkpoint names and
    refuses unknown ones (so a leftover peft / wrapper prefix fails the test)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.loaded: list[str] = []

    def load_weights(self, weights):
        sd = self.hf.state_dict()
        names = []
        for name, t in weights:
            if name not in sd:
                raise KeyError(f"unknown weight {name}")
            sd[name].copy_(t)
            names.append(name)
        self.loaded = names
        return set(names)


class FakeLLM:
    def __init__(self, hf, max_model_len: int = 1024, delay_generate: float = 0.0, delay_load: float = 0.0):
        self.model = FakeVllmModel(hf)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len))
        self.max_model_len = max_model_len
        self.delay_generate, self.delay_load = delay_generate, delay_load
        self.events: list[str] = []
        self.calls: list[tuple[list, list, object]] = []
        self._adapters: dict[int, torch.nn.Module] = {}

    def _model_for(self, lora_request):
        if lora_request is None:
            return self.model.hf
        if lora_request.lora_int_id not in self._adapters:
            from peft import PeftModel

            self._adapters[lora_request.lora_int_id] = PeftModel.from_pretrained(copy.deepcopy(self.model.hf),
                                                                                 lora_request.lora_path).eval()
        return self._adapters[lora_request.lora_int_id]

    def generate(self, prompts, sampling_params, *, use_tqdm=True, lora_request=None):
        self.events.append("generate")
        self.calls.append((prompts, sampling_params, lora_request))
        if self.delay_generate:
            time.sleep(self.delay_generate)
        m = self._model_for(lora_request)
        return [FakeRequestOutput(str(k), None, list(p["prompt_token_ids"]), None,
                                  fake_sample(m, p["prompt_token_ids"], sp, self.max_model_len))
                for k, (p, sp) in enumerate(zip(prompts, sampling_params))]

    def apply_model(self, func):
        self.events.append("apply_model")
        if self.delay_load:
            time.sleep(self.delay_load)
        return [func(self.model)]

    def sleep(self, level=1):
        self.events.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.events.append("wake" + ("" if tags is None else ":" + ",".join(tags)))
        return True

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")
        return True


def colocate(llm, sleep=True) -> ColocateEngine:
    return ColocateEngine(llm, sleep=sleep, sampling_params_cls=FakeSamplingParams, lora_request_cls=FakeLoRARequest)


# ----------------------------------------------------------------------------- fixtures / helpers


def make_model(seed: int = 0):
    tok = char_tokenizer()
    torch.manual_seed(seed)
    m = tiny_llama(len(tok), hidden=32, layers=1, heads=2, intermediate=64, pad_token_id=0, eos_token_id=EOS)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return m.eval()


def make_lora(base):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    return pm


@torch.no_grad()
def teacher_forced_logprobs(model, prompt: list[int], ids: list[int]) -> list[float]:
    seq = torch.tensor([prompt + ids])
    lp = torch.log_softmax(model(seq).logits[0].float(), -1)
    return [float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)]


def prompts_for(tok, texts: list[str], G: int) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in texts for _ in range(G)]


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)


# ----------------------------------------------------------------------------- request building


def test_build_requests_groups_repeated_prompts_and_maps_sampling():
    a, b = [5, 6, 7], [8, 9]
    p = SamplingParams(max_new_tokens=17, temperature=0.7, top_p=0.9, top_k=0)
    reqs = build_requests([a, a, a, b, b, a], p, eos_id=EOS, seed=3)
    assert [(r.prompt, r.n, r.targets) for r in reqs] == [(a, 3, [0, 1, 2]), (b, 2, [3, 4]), (a, 1, [5])]
    assert all(r.max_tokens == 17 and r.temperature == 0.7 and r.top_p == 0.9 and r.top_k == -1 for r in reqs)
    assert all(r.stop_token_ids == [EOS] and not r.replicate for r in reqs)
    seeds = [r.seed for r in reqs]
    assert len(set(seeds)) == 3 and seeds[0] == 3
    # vLLM seeds the n children seed, seed+1, ...: no two samples share a seed
    assert len({r.seed + i for r in reqs for i in range(r.n)}) == 6
    assert build_requests([a], SamplingParams(top_k=5), EOS)[0].top_k == 5
    assert build_requests([a], p, EOS, seed=None)[0].seed is None
    g = build_requests([a, a], SamplingParams(greedy=True, temperature=0.5, top_k=3), EOS)
    assert len(g) == 1 and g[0].n == 1 and g[0].replicate and g[0].temperature == 0.0 and g[0].top_k == -1


def test_sampling_params_and_server_payload():
    r = build_requests([[5, 6]] * 4, SamplingParams(max_new_tokens=9, temperature=0.8, top_p=0.95, top_k=4), EOS, 11)[0]
    sp = to_sampling_params(r, FakeSamplingParams)
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.seed) == (4, 0.8, 0.95, 4, 9, 11)
    assert sp.logprobs == 0 and sp.stop_token_ids == [EOS] and sp.ignore_eos and not sp.detokenize
    body = to_completion_payload(r, "m")
    assert body["prompt"] == [5, 6] and all(isinstance(t, int) for t in body["prompt"])  # token ids, never text
    assert body["n"] == 4 and body["max_tokens"] == 9 and body["top_k"] == 4 and body["seed"] == 11
    assert body["logprobs"] == 0 and body["return_token_ids"] and body["return_tokens_as_token_ids"]
    assert body["stop_token_ids"] == [EOS] and body["ignore_eos"] and body["model"] == "m"
    json.dumps(body)


# ----------------------------------------------------------------------------- result parsing


def test_completion_from_output_eos_length_logprobs():
    lp = [{7: FakeLogprob(-0.5)}, {8: FakeLogprob(-1.0)}, {EOS: FakeLogprob(-0.1)}]
    c = completion_from_output([7, 8, EOS], lp, "stop", EOS, EOS)
    assert c == Completion([7, 8, EOS], True, [-0.5, -1.0, -0.1])  # stop token kept
    c = completion_from_output((7, 8), lp[:2], "length", None, EOS)
    assert c == Completion([7, 8], False, [-0.5, -1.0])
    # anything after a first EOS is dropped (HF backend does the same)
    c = completion_from_output([7, EOS, 9], [{7: -0.5}, {EOS: -0.2}, {9: -3.0}], "length", None, EOS)
    assert c == Completion([7, EOS], True, [-0.5, -0.2])
    # EOS stop that the engine left out of the ids: appended, log-probs unknown
    c = completion_from_output([7, 8], lp[:2], "stop", None, EOS)
    assert c == Completion([7, 8, EOS], True, None)
    # no log-probs requested / reported
    assert completion_from_output([7], None, "length", None, EOS).logprobs is None
    # top-k entries besides the sampled token are ignored
    c = completion_from_output([7], [{3: FakeLogprob(-0.01), 7: FakeLogprob(-4.0)}], "length", None, EOS)
    assert c.logprobs == [-4.0]
    with pytest.raises(RuntimeError, match="abort"):
        completion_from_output([7], None, "abort", None, EOS)


def test_completion_from_server_choice():
    ch = {"index": 0, "text": "", "token_ids": [7, EOS], "finish_reason": "stop", "stop_reason": EOS,
          "logprobs": {"tokens": ["token_id:7", f"token_id:{EOS}"], "token_logprobs": [-0.3, -0.2]}}
    assert completion_from_choice(ch, EOS) == Completion([7, EOS], True, [-0.3, -0.2])
    del ch["token_ids"]  # older servers: ids from return_tokens_as_token_ids
    assert completion_from_choice(ch, EOS) == Completion([7, EOS], True, [-0.3, -0.2])
    ch2 = {"index": 0, "token_ids": [7, 8], "finish_reason": "length", "logprobs": None}
    assert completion_from_choice(ch2, EOS) == Completion([7, 8], False, None)
    with pytest.raises(RuntimeError, match="token ids"):
        completion_from_choice({"index": 0, "text": "x", "logprobs": {"tokens": ["x"]}}, EOS)


# ----------------------------------------------------------------------------- weight names and merging


@pytest.mark.parametrize("name,expected", [
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("module.model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("_orig_mod.lm_head.weight", "lm_head.weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("module.base_model.model.model.norm.weight", "model.norm.weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", None),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", None),
    ("base_model.model.model.embed_tokens.lora_embedding_A.default", None),
    ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),
    ("base_model.model.lm_head.original_module.weight", None),
    ("_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.up_proj.weight",
     "model.layers.0.mlp.up_proj.weight"),
])
def test_hf_to_vllm_name(name, expected):
    assert hf_to_vllm_name(name) == expected


def test_full_weights_plain_model_are_its_state():
    m = make_model()
    with full_weights(m) as w:
        w = list(w)
    assert [n for n, _ in w] == [n for n, _ in m.named_parameters()]
    assert all(torch.equal(t, m.state_dict()[n]) for n, t in w)


def test_full_weights_merge_lora_without_touching_the_policy():
    base = make_model()
    pm = make_lora(copy.deepcopy(base))
    x = torch.tensor([[10, 11, 12, 13]])
    before = pm(x).logits.clone()
    ref = copy.deepcopy(pm).merge_and_unload().state_dict()
    with full_weights(pm) as w:
        got = dict(w)
    assert set(got) == set(n for n, _ in base.named_parameters())  # HF names, no peft leftovers
    assert all(torch.allclose(got[k], ref[k], atol=1e-6) for k in got)
    assert not torch.allclose(got["model.layers.0.self_attn.q_proj.weight"],
                              base.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(pm(x).logits, before)  # the training model is unchanged (still unmerged)
    # the vLLM-side model loads them (unknown names would raise)
    fake = FakeVllmModel(copy.deepcopy(base))
    fake.load_weights(iter(got.items()))
    assert torch.allclose(fake.hf(x).logits, before, atol=1e-5)


def test_export_adapter_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    base = make_model()
    pm = make_lora(copy.deepcopy(base))
    path = export_adapter(pm, tmp_path / "a")
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    x = torch.tensor([[10, 11, 12, 13]])
    assert torch.allclose(loaded(x).logits, pm(x).logits, atol=1e-6)


# ----------------------------------------------------------------------------- colocate backend


def test_colocate_generate_token_id_contract():
    tok = char_tokenizer()
    model = make_model()
    llm = FakeLLM(copy.deepcopy(model))
    be = VLLMBackend(colocate(llm), tok.pad_token_id, EOS, timeout_s=30, seed=0)
    G = 3
    prompts = prompts_for(tok, ["<|user|>12+34<|end|><|assistant|>", "<|user|>7+8<|end|><|assistant|>"], G)
    comps = be.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.0))
    assert len(comps) == len(prompts)
    sent_prompts, sps, _ = llm.calls[0]
    assert [p["prompt_token_ids"] for p in sent_prompts] == [prompts[0], prompts[G]]  # ids as given, deduplicated
    assert [sp.n for sp in sps] == [G, G] and all(sp.logprobs == 0 for sp in sps)
    for p, c in zip(prompts, comps):
        assert 1 <= len(c.ids) <= 10
        assert c.finished == (c.ids[-1] == EOS) and EOS not in c.ids[:-1]
        assert c.logprobs is not None and len(c.logprobs) == len(c.ids)
        # the returned log-probs are those of exactly these ids after exactly this prompt
        assert c.logprobs == pytest.approx(teacher_forced_logprobs(model, p, c.ids), abs=1e-4)
    assert llm.events == ["generate", "sleep1"]  # engine was awake (never slept yet); asleep after
    be.generate(prompts[:1], SamplingParams(max_new_tokens=4))
    assert llm.events[-3:] == ["wake", "generate", "sleep1"]
    # greedy: one request, the sample replicated
    llm.calls.clear()
    g = be.generate(prompts[:G], SamplingParams(max_new_tokens=6, greedy=True))
    assert len(llm.calls[0][0]) == 1 and llm.calls[0][1][0].temperature == 0.0
    assert g[0].ids == g[1].ids == g[2].ids and g[0] is not g[1]


def test_prompt_longer_than_engine_limit_is_an_error_before_sending():
    tok = char_tokenizer()
    llm = FakeLLM(make_model(), max_model_len=24)
    be = VLLMBackend(colocate(llm), tok.pad_token_id, EOS, timeout_s=30)
    prompt = list(range(10, 30))  # 20 tokens
    be.generate([prompt], SamplingParams(max_new_tokens=4))  # 24 fits
    with pytest.raises(PromptTooLong, match="24"):
        be.generate([prompt], SamplingParams(max_new_tokens=5))
    assert len(llm.calls) == 1  # nothing was sent for the failing call


def test_colocate_full_weight_sync_after_optimizer_step():
    model = make_model()
    llm = FakeLLM(copy.deepcopy(model))
    be = VLLMBackend(colocate(llm), 0, EOS, timeout_s=30)
    be.engine.sleep()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    assert not params_equal(llm.model.hf, model)
    be.sync_weights(model)
    assert params_equal(llm.model.hf, model)
    assert llm.events[-3:] == ["wake:weights", "apply_model", "reset_prefix_cache"]
    assert sorted(llm.model.loaded) == sorted(n for n, _ in model.named_parameters())


def test_colocate_lora_merged_sync():
    base = make_model()
    pm = make_lora(copy.deepcopy(base))
    llm = FakeLLM(copy.deepcopy(base))
    be = VLLMBackend(colocate(llm), 0, EOS, timeout_s=30, lora_sync="merged")
    be.sync_weights(pm)
    x = torch.tensor([[10, 11, 12]])
    assert torch.allclose(llm.model.hf(x).logits, pm(x).logits, atol=1e-5)


def test_colocate_lora_adapter_sync_fresh_ids_and_dirs(tmp_path):
    tok = char_tokenizer()
    base = make_model()
    pm = make_lora(copy.deepcopy(base))
    llm = FakeLLM(copy.deepcopy(base))
    be = VLLMBackend(colocate(llm), tok.pad_token_id, EOS, timeout_s=30, lora_sync="adapter", sync_dir=tmp_path)
    be.sync_weights(pm)
    r1 = be.engine.lora_request
    assert r1.lora_int_id == 1 and Path(r1.lora_path).is_dir()
    # generation uses the adapter: log-probs are the LoRA policy's
    prompt = tok("<|user|>5+6<|end|><|assistant|>")["input_ids"]
    c = be.generate([prompt], SamplingParams(max_new_tokens=6))[0]
    assert llm.calls[-1][2] == r1
    assert c.logprobs == pytest.approx(teacher_forced_logprobs(pm, prompt, c.ids), abs=1e-4)
    ids = [1]
    for _ in range(3):
        be.sync_weights(pm)
        ids.append(be.engine.lora_request.lora_int_id)
    assert ids == [1, 2, 3, 4] and len({be.engine.lora_request.lora_path, r1.lora_path}) == 2
    assert not Path(r1.lora_path).exists()  # old adapters are cleaned up (the last 2 kept)
    assert len(list(tmp_path.iterdir())) == 2


def test_timeouts_raise_instead_of_hanging():
    tok = char_tokenizer()
    llm = FakeLLM(make_model(), delay_generate=5.0)
    be = VLLMBackend(colocate(llm), tok.pad_token_id, EOS, timeout_s=0.3)
    t0 = time.time()
    with pytest.raises(RolloutTimeout, match=r"generate.*0\.3 s"):
        be.generate([[10, 11, 12]], SamplingParams(max_new_tokens=3))
    assert time.time() - t0 < 2.0
    with pytest.raises(RuntimeError, match="unusable"):
        be.generate([[10, 11, 12]], SamplingParams(max_new_tokens=3))
    model = make_model()
    llm2 = FakeLLM(copy.deepcopy(model), delay_load=5.0)
    be2 = VLLMBackend(colocate(llm2), tok.pad_token_id, EOS, timeout_s=0.3)
    t0 = time.time()
    with pytest.raises(RolloutTimeout, match="weight sync"):
        be2.sync_weights(model)
    assert time.time() - t0 < 2.0
    with pytest.raises(ValueError, match="boom"):  # errors inside pass through unchanged
        call_with_timeout(lambda: (_ for _ in ()).throw(ValueError("boom")), 5, "x")


# ----------------------------------------------------------------------------- server backend


class FakeVLLMServer:
    """The subset of vLLM's OpenAI-compatible server the backend talks to, on 127.0.0.1:<free port>."""

    def __init__(self, hf, max_model_len: int = 1024, delay: float = 0.0):
        self.hf, self.max_model_len, self.delay = hf, max_model_len, delay
        self.requests: list[tuple[str, dict]] = []
        self.adapters: dict[str, torch.nn.Module] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code, obj):
                raw = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def do_GET(self):
                if self.path == "/v1/models":
                    return self._send(200, {"data": [{"id": "tiny", "max_model_len": outer.max_model_len}]})
                self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                outer.requests.append((self.path, body))
                if outer.delay:
                    time.sleep(outer.delay)
                try:
                    return self._send(200, outer.handle(self.path, body))
                except KeyError as e:
                    return self._send(404, {"error": str(e)})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def handle(self, path: str, body: dict) -> dict:
        if path == "/v1/completions":
            assert isinstance(body["prompt"], list) and all(isinstance(t, int) for t in body["prompt"])
            sp = FakeSamplingParams(n=body["n"], temperature=body["temperature"], top_p=body["top_p"],
                                    top_k=body["top_k"], max_tokens=body["max_tokens"], seed=body["seed"],
                                    logprobs=body["logprobs"], stop_token_ids=body["stop_token_ids"])
            model = self.adapters.get(body["model"], self.hf)
            outs = fake_sample(model, body["prompt"], sp, self.max_model_len)
            choices = [{"index": o.index, "text": "", "token_ids": list(o.token_ids) if body.get("return_token_ids") else None,
                        "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                        "logprobs": {"tokens": [f"token_id:{t}" for t in o.token_ids],
                                     "token_logprobs": [d[t].logprob for d, t in zip(o.logprobs, o.token_ids)],
                                     "top_logprobs": None, "text_offset": []}} for o in outs]
            return {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "choices": choices}
        if path == "/collective_rpc":
            assert body["method"] == "reload_weights"
            from safetensors.torch import load_file

            sd = self.hf.state_dict()
            for f in sorted(Path(body["kwargs"]["weights_path"]).glob("*.safetensors")):
                for k, v in load_file(str(f)).items():
                    sd[k].copy_(v)  # KeyError on a wrong name -> 404
            return {"results": [None]}
        if path == "/reset_prefix_cache":
            return {"success": True}
        if path == "/v1/load_lora_adapter":
            from peft import PeftModel

            self.adapters[body["lora_name"]] = PeftModel.from_pretrained(copy.deepcopy(self.hf), body["lora_path"]).eval()
            return {}
        if path == "/v1/unload_lora_adapter":
            self.adapters.pop(body["lora_name"])
            return {}
        raise KeyError(path)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    made = []

    def make(hf, **kw):
        s = FakeVLLMServer(hf, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_server_generate_and_full_weight_sync(server, tmp_path):
    tok = char_tokenizer()
    model = make_model()
    srv = server(copy.deepcopy(model), max_model_len=64)
    be = VLLMBackend(ServerEngine(srv.url, timeout_s=10), tok.pad_token_id, EOS, timeout_s=10, seed=5,
                     sync_dir=tmp_path)
    G = 2
    prompts = prompts_for(tok, ["<|user|>1+2<|end|><|assistant|>", "<|user|>30+4<|end|><|assistant|>"], G)
    comps = be.generate(prompts, SamplingParams(max_new_tokens=8))
    bodies = [b for p, b in srv.requests if p == "/v1/completions"]
    assert sorted(b["prompt"] for b in bodies) == sorted([prompts[0], prompts[G]]) and all(b["n"] == G for b in bodies)
    for p, c in zip(prompts, comps):
        assert c.finished == (c.ids[-1] == EOS) and len(c.ids) <= 8
        assert c.logprobs == pytest.approx(teacher_forced_logprobs(model, p, c.ids), abs=1e-4)
    with pytest.raises(PromptTooLong, match="64"):
        be.generate([list(range(10, 70))], SamplingParams(max_new_tokens=8))
    # full-weight sync through a shared directory + /collective_rpc reload_weights
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    be.sync_weights(model)
    assert params_equal(srv.hf, model)
    assert [p for p, _ in srv.requests[-2:]] == ["/collective_rpc", "/reset_prefix_cache"]


def test_server_lora_adapter_sync(server, tmp_path):
    tok = char_tokenizer()
    base = make_model()
    pm = make_lora(copy.deepcopy(base))
    srv = server(copy.deepcopy(base))
    rollout = Config.load(None, ["rollout.backend=vllm", "rollout.vllm_mode=server", f"rollout.vllm_server_url={srv.url}",
                                 f"rollout.vllm_sync_dir={tmp_path}", "rollout.vllm_timeout_s=10"]).rollout
    be = build_backend(rollout, pm, tok.pad_token_id, EOS)  # syncs the adapter at start
    first = be.engine.adapter_name
    assert isinstance(be, VLLMBackend) and be.lora_sync == "adapter" and first.startswith("ogls-sd-") and first.endswith("-1")
    prompt = tok("<|user|>9+9<|end|><|assistant|>")["input_ids"]
    c = be.generate([prompt], SamplingParams(max_new_tokens=6))[0]
    assert [b for p, b in srv.requests if p == "/v1/completions"][-1]["model"] == first
    assert c.logprobs == pytest.approx(teacher_forced_logprobs(pm, prompt, c.ids), abs=1e-4)
    be.sync_weights(pm)
    second = be.engine.adapter_name
    assert second == first[:-1] + "2" and list(srv.adapters) == [second]  # the old adapter was unloaded


def test_server_timeout_and_unreachable(server):
    srv = server(make_model(), delay=3.0)
    be = VLLMBackend(ServerEngine(srv.url, timeout_s=0.3), 0, EOS, timeout_s=0.3)
    be.engine._info_loaded, be.engine.model, be.engine._max_len = True, "tiny", 1024  # skip /v1/models
    t0 = time.time()
    with pytest.raises(RolloutTimeout, match="0.3"):
        be.generate([[10, 11]], SamplingParams(max_new_tokens=2))
    assert time.time() - t0 < 2.5
    dead = ServerEngine("http://127.0.0.1:9", timeout_s=2)  # discard port: refused
    with pytest.raises(RuntimeError, match="failed"):
        dead.max_model_len()


# ----------------------------------------------------------------------------- factory and trainer


def test_build_backend_hf_and_config_choices(tiny_model):
    cfg = Config()
    assert isinstance(build_backend(cfg.rollout, tiny_model, 0, EOS), HFBackend)
    assert "vllm" in [f for f in type(cfg.rollout).__dataclass_fields__["backend"].metadata["choices"]]
    c = Config.load(None, ["rollout.backend=vllm", "rollout.vllm_mode=server", "rollout.vllm_timeout_s=5"])
    assert c.rollout.vllm_mode == "server" and c.rollout.vllm_timeout_s == 5.0
    from ogls_sd.config import ConfigError

    for bad in ("rollout.vllm_mode=remote", "rollout.vllm_timeout_s=0", "rollout.vllm_gpu_memory_utilization=1.5"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            Config.load(None, [bad])


def test_trainer_uses_vllm_backend_and_syncs_every_step(tiny_cfg, monkeypatch):
    import ogls_sd.rollout.vllm_backend as rv
    from ogls_sd.trainer import train

    made: list[FakeLLM] = []

    def fake_engine(rollout, model, cfg, export_dir, adapter, rank=0, world=1):
        from ogls_sd.modeling import unwrap

        llm = FakeLLM(copy.deepcopy(unwrap(model)).eval())
        made.append(llm)
        return colocate(llm, sleep=rollout.vllm_sleep)

    monkeypatch.setattr(rv, "make_colocate_engine", fake_engine)
    cfg = tiny_cfg("rollout.backend=vllm", "train.steps=2", "eval.before_after=false", "train.device=cpu")
    train(cfg)
    llm = made[0]
    assert llm.events.count("generate") == 2 and llm.events.count("apply_model") == 2
    recs = [json.loads(x) for x in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all("loss" in r for r in recs)
    # after the last sync the engine holds the trained weights
    from transformers import AutoModelForCausalLM

    ckpt = sorted((Path(cfg.train.output_dir) / "checkpoints").iterdir())[-1]
    trained = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    assert params_equal(llm.model.hf, trained)


def test_export_initial_model_is_a_loadable_hf_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    from ogls_sd.rollout.vllm_backend import export_initial_model

    base = make_model()
    pm = make_lora(copy.deepcopy(base))
    x = torch.tensor([[10, 11, 12]])
    merged = AutoModelForCausalLM.from_pretrained(export_initial_model(pm, tmp_path / "merged")).eval()
    assert torch.allclose(merged(x).logits, pm(x).logits, atol=1e-5)
    # adapter sync: the engine holds the base weights, the adapter is loaded separately
    plain = AutoModelForCausalLM.from_pretrained(export_initial_model(pm, tmp_path / "base", merge_lora=False)).eval()
    assert params_equal(plain, base)


def test_save_weights_shards_with_an_index(tmp_path):
    from transformers import AutoModelForCausalLM

    from ogls_sd.rollout.vllm_backend import save_weights

    m = make_model()
    with full_weights(m) as w:
        save_weights(w, tmp_path, shard_bytes=20_000)
    m.config.save_pretrained(str(tmp_path))
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert params_equal(AutoModelForCausalLM.from_pretrained(tmp_path), m)

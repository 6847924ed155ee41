"""vLLM rollout backend: prompt token ids in, sampled token ids and their log-probs out.

Two modes (``rollout.vllm_mode``):

* ``colocate`` - an in-process ``vllm.LLM`` on the training GPU(s), asleep between rollouts
  (``llm.sleep()`` / ``llm.wake_up()``) so that training gets the memory back;
* ``server`` - HTTP to a running vLLM OpenAI-compatible server (``vllm serve ...``): prompts go to
  ``/v1/completions`` as lists of token ids, with ``return_token_ids`` and ``logprobs=0`` so that the
  sampled token ids and their log-probs come back.

Same contract as :class:`ogls_sd.rollout.hf.HFBackend`: prompts are token ids and are never decoded or
re-encoded (peer defect #1); a completion's ``ids`` are exactly the sampled tokens, ending with the
EOS id when the model stopped (``finished``). The engine stops only at ``eos_id`` (``ignore_eos`` +
``stop_token_ids=[eos_id]``), as HF ``generate`` does. A prompt that does not fit the engine's
maximum model length together with ``max_new_tokens`` is an error before anything is sent (peer
defect #5: never a silently truncated privileged prefix).

Weights are synced after every optimizer step (:meth:`VLLMBackend.sync_weights`): with LoRA and
``rollout.vllm_lora_sync=adapter`` only the adapter (saved to a fresh directory, loaded under a
fresh adapter id), otherwise the full weights - LoRA merged in, computed without touching the
training model - under their Hugging Face checkpoint names (vLLM's ``load_weights`` maps those to
its own fused layers): wrapper prefixes (``module.``, ``_orig_mod.``, ``_fsdp_wrapped_module.``,
peft's ``base_model.model.``) and peft's ``.base_layer.`` are stripped and LoRA factors dropped.
Sharded parameters (DeepSpeed ZeRO-3, FSDP) are gathered first, which is a collective: every rank
calls ``sync_weights``. Every engine operation runs under ``rollout.vllm_timeout_s`` and raises
:class:`~ogls_sd.rollout.RolloutTimeout` naming the operation instead of hanging (peer defect #6).

Log-probs are what vLLM reports for the sampled tokens (its ``logprobs_mode``, by default the raw
model distribution before temperature / top-k / top-p).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .contract import Completion, RolloutTimeout, SamplingParams, check_prompt_lengths, register_backend

# ----------------------------------------------------------------------------- requests


@dataclass
class GenRequest:
    """One engine request: a prompt sampled ``n`` times; its samples fill ``targets`` (indices into
    the caller's prompt list). ``replicate``: greedy - one sample is copied to every target."""

    prompt: list[int]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int  # -1 = off (accepted by every vLLM version)
    seed: int | None
    stop_token_ids: list[int]
    targets: list[int]
    replicate: bool = False


def build_requests(prompts: list[list[int]], params: SamplingParams, eos_id: int, seed: int | None = None) -> list[GenRequest]:
    """Group consecutive identical prompts (the trainer repeats each student prompt G times) into
    one request with ``n = G``. Greedy requests use ``n = 1`` (vLLM refuses ``n > 1`` at
    temperature 0) and the sample is replicated. ``seed`` (when given) makes request ``k`` use
    ``seed + 65537 k`` (vLLM seeds the ``n`` samples of a request ``seed``, ``seed + 1``, ...)."""
    reqs: list[GenRequest] = []
    i = 0
    while i < len(prompts):
        j = i + 1
        while j < len(prompts) and prompts[j] == prompts[i]:
            j += 1
        k = len(reqs)
        reqs.append(GenRequest(
            prompt=list(prompts[i]),
            n=1 if params.greedy else j - i,
            max_tokens=params.max_new_tokens,
            temperature=0.0 if params.greedy else float(params.temperature),
            top_p=1.0 if params.greedy else float(params.top_p),
            top_k=-1 if (params.greedy or params.top_k <= 0) else int(params.top_k),
            seed=None if seed is None else (seed + k * 65_537) % (2**31 - 1),
            stop_token_ids=[eos_id],
            targets=list(range(i, j)),
            replicate=params.greedy,
        ))
        i = j
    return reqs


def to_sampling_params(req: GenRequest, cls: Any) -> Any:
    """``vllm.SamplingParams`` (or a look-alike ``cls``) for ``req``: stop only at the EOS id (kept
    in the output ids), return the sampled token's log-prob, no detokenisation."""
    return cls(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, max_tokens=req.max_tokens,
               seed=req.seed, logprobs=0, stop_token_ids=list(req.stop_token_ids), ignore_eos=True,
               detokenize=False, skip_special_tokens=False)


def to_completion_payload(req: GenRequest, model: str) -> dict:
    """Body of a vLLM ``/v1/completions`` request for ``req`` (prompt as token ids)."""
    return {
        "model": model, "prompt": list(req.prompt), "n": req.n, "max_tokens": req.max_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "seed": req.seed,
        "logprobs": 0, "stop_token_ids": list(req.stop_token_ids), "ignore_eos": True,
        "skip_special_tokens": False, "return_token_ids": True, "return_tokens_as_token_ids": True,
        "echo": False, "stream": False,
    }


# ----------------------------------------------------------------------------- results


def _lp_value(entry: Any) -> float:
    return float(entry.logprob if hasattr(entry, "logprob") else entry)


def completion_from_output(token_ids: Any, logprobs: Any, finish_reason: str | None, stop_reason: Any,
                           eos_id: int) -> Completion:
    """A :class:`Completion` from one vLLM ``CompletionOutput``'s fields.

    ``logprobs`` is vLLM's per-position ``{token_id: Logprob}`` list (or a list of floats, or None).
    ``finished`` iff the ids end with ``eos_id`` (as in the HF backend); anything after a first EOS
    is dropped. A stop at EOS that vLLM left out of the ids gets the EOS appended (its log-prob is
    then unknown, so ``logprobs`` is None).
    """
    if finish_reason in ("abort", "error"):
        raise RuntimeError(f"vLLM request ended with finish_reason={finish_reason!r} (stop_reason={stop_reason!r})")
    ids = [int(t) for t in token_ids]
    lps: list[float] | None = None
    if logprobs is not None:
        lps = []
        for pos, tid in enumerate(ids):
            entry = logprobs[pos] if pos < len(logprobs) else None
            if isinstance(entry, dict):
                entry = entry.get(tid, entry.get(str(tid)))
            if entry is None:
                lps = None
                break
            lps.append(_lp_value(entry))
    if eos_id in ids:
        cut = ids.index(eos_id) + 1
        ids = ids[:cut]
        lps = lps[:cut] if lps is not None else None
        return Completion(ids, True, lps)
    if finish_reason == "stop" and stop_reason in (None, eos_id):
        return Completion(ids + [eos_id], True, None)
    return Completion(ids, False, lps)


def completion_from_choice(choice: dict, eos_id: int) -> Completion:
    """A :class:`Completion` from one ``choices[i]`` of a vLLM ``/v1/completions`` response."""
    lp = choice.get("logprobs") or {}
    ids = choice.get("token_ids")
    if ids is None:  # older servers: ids only via return_tokens_as_token_ids ("token_id:123")
        toks = lp.get("tokens")
        if not toks or not all(isinstance(t, str) and t.startswith("token_id:") for t in toks):
            raise RuntimeError("vLLM server returned no token ids: it must support return_token_ids or "
                               "return_tokens_as_token_ids (vLLM >= 0.5)")
        ids = [int(t.split(":", 1)[1]) for t in toks]
    token_lps = lp.get("token_logprobs")
    if token_lps is not None and (len(token_lps) < len(ids) or any(v is None for v in token_lps[: len(ids)])):
        token_lps = None
    return completion_from_output(ids, token_lps, choice.get("finish_reason"), choice.get("stop_reason"), eos_id)


# ----------------------------------------------------------------------------- weights

_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_LORA_PART = re.compile(r"(^|\.)lora_[A-Za-z_]+(\.|$)")
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")


def _strip_wrappers(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def hf_to_vllm_name(name: str) -> str | None:
    """The checkpoint name vLLM's ``load_weights`` expects for a training parameter name, or None
    for parameters that are not model weights (LoRA factors, peft's original copies).

    ``module.`` (DDP / DeepSpeed), ``_orig_mod.`` (torch.compile), ``_fsdp_wrapped_module.`` /
    ``_checkpoint_wrapped_module.`` (FSDP, activation checkpointing) and peft's
    ``base_model.model.`` prefix are removed, ``.base_layer.`` and ``.modules_to_save.<adapter>.``
    collapse to ``.``. The remaining Hugging Face names are what vLLM model classes load.
    """
    name = _strip_wrappers(name)
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    if _LORA_PART.search(name) or ".original_module." in name:
        return None
    name = _MODULES_TO_SAVE.sub(".", name)
    return name.replace(".base_layer.", ".")


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module under DDP / DeepSpeed / torch.compile wrappers (peft and FSDP wrappers kept)."""
    m = model
    for _ in range(4):
        kind = type(m).__name__
        if kind in ("DistributedDataParallel", "DeepSpeedEngine") and isinstance(getattr(m, "module", None), nn.Module):
            m = m.module
        elif kind == "OptimizedModule" and isinstance(getattr(m, "_orig_mod", None), nn.Module):
            m = m._orig_mod
        else:
            break
    return m


def is_peft_model(model: nn.Module) -> bool:
    m = unwrap_parallel(model)
    if type(m).__name__ == "FullyShardedDataParallel":
        m = m.module
    return hasattr(m, "peft_config") and hasattr(m, "disable_adapter")


@contextlib.contextmanager
def gathered_parameters(model: nn.Module) -> Iterator[None]:
    """Full (unsharded) parameters inside the block: DeepSpeed ZeRO-3 ``GatheredParameters``,
    FSDP ``summon_full_params``; nothing to do otherwise. Collective: all ranks must enter."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # noqa: PLC0415 - only under ZeRO-3

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
        return
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False, recurse=True):
            yield
        return
    yield


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 DTensor


def _lora_layers(model: nn.Module) -> dict[str, tuple[nn.Module, list[str]]]:
    """``{name of a LoRA layer's base weight: (layer, active adapters)}`` for unmerged layers."""
    out: dict[str, tuple[nn.Module, list[str]]] = {}
    for mname, mod in model.named_modules():
        if not (hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer") and hasattr(mod, "lora_A")):
            continue
        if getattr(mod, "merged", False) or getattr(mod, "disable_adapters", False):
            continue
        names = set(getattr(mod, "lora_A", {}).keys()) | set(getattr(mod, "lora_embedding_A", {}).keys())
        active = [a for a in getattr(mod, "active_adapters", []) if a in names]
        if not active:
            continue
        if any(a in getattr(mod, "lora_variant", {}) for a in active):
            raise NotImplementedError(f"{mname}: merged weight sync does not support LoRA variants (DoRA, ...); "
                                      "use rollout.vllm_lora_sync=adapter")
        out[f"{mname}.base_layer.weight"] = (mod, active)
    return out


def vllm_weights(model: nn.Module, merge_lora: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """``(vLLM checkpoint name, tensor)`` for every model weight, LoRA merged in (W + ΔW of the
    active adapters) unless ``merge_lora=False``; the training model is not modified. A generator:
    one merged tensor exists at a time. Use inside :func:`gathered_parameters` for sharded models;
    with FSDP2 every rank must consume it (each tensor is gathered collectively)."""
    layers = _lora_layers(model) if merge_lora else {}
    seen: set[str] = set()
    for name, p in model.named_parameters():
        new = hf_to_vllm_name(name)
        if new is None or new in seen:
            continue
        seen.add(new)
        t = _full(p.detach())
        if name in layers:
            mod, active = layers[name]
            acc = torch.promote_types(t.dtype, torch.float32)  # bf16 weights merge in fp32, fp64 stays fp64
            merged = t.to(acc)
            for a in active:
                merged = merged + _full(mod.get_delta_weight(a)).to(t.device, acc)
            t = merged.to(p.dtype)
        yield new, t


@contextlib.contextmanager
def full_weights(model: nn.Module, merge_lora: bool = True) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
    """Gathered, LoRA-merged weights under vLLM names (see :func:`vllm_weights`), to be consumed
    inside the block."""
    with torch.no_grad(), gathered_parameters(model):
        yield vllm_weights(model, merge_lora)


def _peft_of(model: nn.Module) -> nn.Module:
    m = unwrap_parallel(model)
    if type(m).__name__ == "FullyShardedDataParallel":
        m = m.module
    return m


def adapter_state(model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """``(adapter name, {peft file key: tensor on CPU})`` of the active LoRA adapter, keys as peft's
    ``save_pretrained`` writes them. Gathers sharded parameters: collective, every rank calls it."""
    peft_model = _peft_of(model)
    adapter = getattr(peft_model, "active_adapter", "default")
    adapter = adapter[0] if isinstance(adapter, (list, tuple)) else adapter
    sd: dict[str, torch.Tensor] = {}
    with torch.no_grad(), gathered_parameters(model):
        for name, p in model.named_parameters():
            name = _strip_wrappers(name)
            if not _LORA_PART.search(name) or f".{adapter}." not in name + ".":
                continue
            if not name.startswith("base_model.model."):
                name = "base_model.model." + name
            sd[name.replace(f".{adapter}.", ".")] = _full(p.detach()).to("cpu").contiguous().clone()
    if not sd:
        raise ValueError("the model has no LoRA parameters for adapter " + repr(adapter))
    return adapter, sd


def export_adapter(model: nn.Module, path: Path, write: bool = True) -> Path:
    """Write the active LoRA adapter as a peft adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) vLLM can load. Every rank calls it (sharded parameters are
    gathered); only ranks with ``write`` write."""
    from safetensors.torch import save_file

    adapter, sd = adapter_state(model)
    if write:
        path.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        _peft_of(model).peft_config[adapter].save_pretrained(str(path))
    return path


def save_weights(weights: Iterable[tuple[str, torch.Tensor]], path: Path, shard_bytes: int = 4 * 1024**3) -> Path:
    """Write weights in the Hugging Face layout (``model.safetensors``, or
    ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``): a directory
    vLLM reloads from and ``from_pretrained`` reads."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in weights:
        t = t.detach().to("cpu").contiguous().clone()
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    return path


# ----------------------------------------------------------------------------- timeouts


def call_with_timeout(fn: Callable[[], Any], timeout_s: float, op: str) -> Any:
    """``fn()`` in a worker thread; :class:`RolloutTimeout` when it has not returned after
    ``timeout_s`` seconds (the thread is abandoned; the engine is then unusable)."""
    box: dict[str, Any] = {}
    dev = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def target() -> None:
        try:
            if dev is not None:
                torch.cuda.set_device(dev)  # the current device is per thread
            with torch.no_grad():  # so is grad mode
                box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name=f"ogls-sd-vllm-{op}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise RolloutTimeout(f"vLLM {op} did not finish within {timeout_s:g} s (rollout.vllm_timeout_s); stopping "
                             "instead of waiting forever. The engine may be hung (e.g. a weight sync under LoRA, "
                             "ZeRO-3 or FSDP, or an unreachable server)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ----------------------------------------------------------------------------- engines


class ColocateEngine:
    """An in-process ``vllm.LLM`` (or a look-alike: tests use fakes). Asleep between rollouts when
    ``sleep`` and the engine supports it."""

    mode = "colocate"

    def __init__(self, llm: Any, *, sleep: bool = True, sampling_params_cls: Any = None, lora_request_cls: Any = None):
        if sampling_params_cls is None or lora_request_cls is None:
            import vllm  # noqa: PLC0415
            from vllm.lora.request import LoRARequest  # noqa: PLC0415

            sampling_params_cls = sampling_params_cls or vllm.SamplingParams
            lora_request_cls = lora_request_cls or LoRARequest
        self.llm, self.sp_cls, self.lora_cls = llm, sampling_params_cls, lora_request_cls
        self.sleep_enabled = sleep and hasattr(llm, "sleep") and hasattr(llm, "wake_up")
        self.asleep: set[str] = set()  # memory kinds currently asleep: weights, kv_cache
        self.lora_request: Any = None

    def max_model_len(self) -> int | None:
        eng = getattr(self.llm, "llm_engine", None)
        for cfg in (getattr(eng, "model_config", None), getattr(getattr(eng, "vllm_config", None), "model_config", None)):
            if cfg is not None and getattr(cfg, "max_model_len", None):
                return int(cfg.max_model_len)
        return None

    def _wake(self, tags: list[str] | None = None) -> None:
        if not self.asleep:
            return
        if tags is None:
            self.llm.wake_up()
            self.asleep.clear()
        else:
            try:
                self.llm.wake_up(tags=tags)
            except TypeError:  # vLLM without tagged wake-up
                self.llm.wake_up()
                self.asleep.clear()
                return
            self.asleep -= set(tags)

    def sleep(self) -> None:
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}

    def run(self, reqs: list[GenRequest], eos_id: int) -> list[list[Completion]]:
        self._wake()
        try:
            outs = self.llm.generate([{"prompt_token_ids": r.prompt} for r in reqs],
                                     [to_sampling_params(r, self.sp_cls) for r in reqs],
                                     use_tqdm=False, lora_request=self.lora_request)
        finally:
            self.sleep()
        if len(outs) != len(reqs):
            raise RuntimeError(f"vLLM returned {len(outs)} results for {len(reqs)} requests")
        res = []
        for r, o in zip(reqs, outs):
            if list(o.prompt_token_ids or r.prompt) != r.prompt:
                raise RuntimeError("vLLM changed a prompt's token ids (it must receive them unchanged)")
            res.append([completion_from_output(c.token_ids, c.logprobs, c.finish_reason, c.stop_reason, eos_id)
                        for c in sorted(o.outputs, key=lambda c: c.index)])
        return res

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], step_dir: Path | None = None) -> None:
        self._wake(["weights"])
        self.llm.apply_model(lambda model: model.load_weights(iter(weights)))  # in-process: nothing is copied
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def load_adapter(self, name: str, int_id: int, path: Path) -> None:
        self.lora_request = self.lora_cls(lora_name=name, lora_int_id=int_id, lora_path=str(path))
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.llm = None


class ServerEngine:
    """HTTP client of a vLLM OpenAI-compatible server."""

    mode = "server"

    def __init__(self, url: str, model: str = "", timeout_s: float = 600.0, max_concurrency: int = 32):
        self.url, self.model, self.timeout_s, self.max_concurrency = url.rstrip("/"), model, timeout_s, max_concurrency
        self._max_len: int | None = None
        self._info_loaded = False
        self.adapter_name: str | None = None

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            hint = ""
            if e.code == 404 and path in ("/collective_rpc", "/reset_prefix_cache"):
                hint = " (start the server with VLLM_SERVER_DEV_MODE=1 for full-weight sync)"
            elif e.code == 404 and "lora" in path:
                hint = " (start the server with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
            raise RuntimeError(f"vLLM server {method} {path}: HTTP {e.code}{hint}: {detail}") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise RolloutTimeout(f"vLLM server {method} {path} did not answer within {self.timeout_s:g} s "
                                     "(rollout.vllm_timeout_s)") from None
            raise RuntimeError(f"vLLM server {self.url}: {method} {path} failed: {reason}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw.decode(errors="replace")

    def _load_info(self) -> None:
        if self._info_loaded:
            return
        data = (self.request("GET", "/v1/models") or {}).get("data") or []
        if not data:
            raise RuntimeError(f"vLLM server {self.url}: /v1/models lists no model")
        card = next((d for d in data if d.get("id") == self.model), None) if self.model else data[0]
        if card is None:
            raise RuntimeError(f"vLLM server {self.url} does not serve {self.model!r}; it serves "
                               + ", ".join(str(d.get("id")) for d in data))
        self.model = card["id"]
        self._max_len = card.get("max_model_len")
        self._info_loaded = True

    def max_model_len(self) -> int | None:
        self._load_info()
        return self._max_len

    def run(self, reqs: list[GenRequest], eos_id: int) -> list[list[Completion]]:
        self._load_info()
        model = self.adapter_name or self.model

        def one(r: GenRequest) -> list[Completion]:
            resp = self.request("POST", "/v1/completions", to_completion_payload(r, model))
            choices = sorted(resp.get("choices") or [], key=lambda c: c.get("index", 0))
            if len(choices) != r.n:
                raise RuntimeError(f"vLLM server returned {len(choices)} choices for n={r.n}")
            return [completion_from_choice(c, eos_id) for c in choices]

        if len(reqs) == 1:
            return [one(reqs[0])]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(reqs))) as pool:
            return list(pool.map(one, reqs))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], step_dir: Path | None = None) -> None:
        if step_dir is None:
            raise ValueError("server weight sync needs a directory the server can read (rollout.vllm_sync_dir)")
        save_weights(weights, step_dir)
        self.request("POST", "/collective_rpc", {"method": "reload_weights",
                                                 "kwargs": {"weights_path": str(step_dir.resolve())}})
        self.request("POST", "/reset_prefix_cache")

    def load_adapter(self, name: str, int_id: int, path: Path) -> None:
        self.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())})
        old, self.adapter_name = self.adapter_name, name
        if old:
            with contextlib.suppress(RuntimeError):
                self.request("POST", "/v1/unload_lora_adapter", {"lora_name": old})

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- backend


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class VLLMBackend:
    """Rollouts from a vLLM engine (:class:`ColocateEngine` or :class:`ServerEngine`)."""

    def __init__(self, engine: Any, pad_id: int, eos_id: int, *, timeout_s: float = 600.0, seed: int | None = 0,
                 rank: int = 0, lora_sync: str = "merged", sync_dir: str | Path | None = None,
                 is_main_process: bool = True, keep_syncs: int = 2):
        self.engine, self.pad_id, self.eos_id, self.timeout_s = engine, pad_id, eos_id, timeout_s
        self.seed, self.rank, self.lora_sync = seed, rank, lora_sync
        self.sync_dir = Path(sync_dir) if sync_dir else None
        self.is_main_process, self.keep_syncs = is_main_process, keep_syncs
        self.version = 0  # weight syncs so far
        self.calls = 0  # generate calls so far
        self.last_sync_s = 0.0
        self._broken: str | None = None
        self._synced_dirs: list[Path] = []
        self._run_tag = uuid.uuid4().hex[:8]  # adapter names stay unique on a server that outlives a run

    # -- construction from the run config
    @classmethod
    def from_config(cls, rollout: Any, model: nn.Module, pad_id: int, eos_id: int, *, cfg: Any = None,
                    is_main_process: bool = True, engine: Any = None) -> "VLLMBackend":
        rank, world = _dist_rank_world()
        seed = cfg.train.seed if cfg is not None else 0
        if rollout.vllm_sync_dir:
            sync_dir = Path(rollout.vllm_sync_dir)
        elif cfg is not None:
            sync_dir = Path(cfg.train.output_dir) / "vllm"
        else:
            import tempfile

            sync_dir = Path(tempfile.mkdtemp(prefix="ogls_sd_vllm_"))
        adapter = is_peft_model(model) and rollout.vllm_lora_sync == "adapter"
        if rollout.vllm_mode == "server":
            if engine is None:
                engine = ServerEngine(rollout.vllm_server_url, rollout.vllm_server_model, rollout.vllm_timeout_s)
        elif engine is None:
            engine = make_colocate_engine(rollout, model, cfg, sync_dir / f"init_rank{rank}", adapter, rank, world)
        elif not hasattr(engine, "run"):  # a bare vllm.LLM
            engine = ColocateEngine(engine, sleep=rollout.vllm_sleep)
        backend = cls(engine, pad_id, eos_id, timeout_s=rollout.vllm_timeout_s, seed=seed, rank=rank,
                      lora_sync="adapter" if adapter else "merged", sync_dir=sync_dir, is_main_process=is_main_process)
        # the engine must start from the policy's weights: a server serves whatever it was started
        # with, an engine loaded from model.name misses a resumed checkpoint; an exported one has them
        if getattr(engine, "mode", "") == "server" or adapter or not _needs_export(cfg):
            backend.sync_weights(model)
        else:
            backend._timed("sleep", engine.sleep)
        return backend

    # -- helpers
    def _timed(self, op: str, fn: Callable[[], Any]) -> Any:
        if self._broken:
            raise RuntimeError(f"vLLM backend unusable after an earlier failure: {self._broken}")
        try:
            return call_with_timeout(fn, self.timeout_s, op)
        except RolloutTimeout as e:
            self._broken = str(e)
            raise

    def _call_seed(self) -> int | None:
        if self.seed is None:
            return None
        return (self.seed * 1_000_003 + self.rank * 7_919 + self.calls * 104_729) % (2**31 - 1)

    # -- contract
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        if not prompts:
            return []
        max_len = self._timed("max_model_len query", self.engine.max_model_len)
        check_prompt_lengths(prompts, params.max_new_tokens, max_len, f"the vLLM engine ({self.engine.mode})")
        reqs = build_requests(prompts, params, self.eos_id, self._call_seed())
        self.calls += 1
        results = self._timed(f"generate ({len(prompts)} sequences)", lambda: self.engine.run(reqs, self.eos_id))
        out: list[Completion | None] = [None] * len(prompts)
        for r, comps in zip(reqs, results):
            if r.replicate:
                comps = [Completion(list(comps[0].ids), comps[0].finished,
                                    None if comps[0].logprobs is None else list(comps[0].logprobs)) for _ in r.targets]
            if len(comps) != len(r.targets):
                raise RuntimeError(f"vLLM returned {len(comps)} samples for a prompt requested {len(r.targets)} times")
            for t, c in zip(r.targets, comps):
                out[t] = c
        return out  # type: ignore[return-value]

    def sync_weights(self, model: nn.Module) -> None:
        """Push the policy's current weights to the engine (call on every rank: gathering sharded
        parameters is collective). Adapter-only with LoRA when configured, merged weights otherwise."""
        t0 = time.time()
        self.version += 1
        pushes = self.engine.mode == "colocate" or self.is_main_process
        server = self.engine.mode == "server"
        step_dir = None
        if self.sync_dir is not None:
            tag = "adapter" if self.lora_sync == "adapter" else "weights"
            step_dir = self.sync_dir / f"{tag}_{self.version:06d}" / (f"rank{self.rank}" if not server else "")
        if self.lora_sync == "adapter":
            if step_dir is None:
                raise ValueError("adapter sync needs rollout.vllm_sync_dir")
            export_adapter(model, step_dir, write=pushes)  # every rank: gathering sharded parameters is collective
            if pushes:
                name = f"ogls-sd-{self._run_tag}-{self.version}"
                self._timed("adapter sync", lambda: self.engine.load_adapter(name, self.version, step_dir))
        else:
            with full_weights(model) as weights:
                if pushes:
                    self._timed("weight sync", lambda: self.engine.load_weights(weights, step_dir))
                else:
                    for _ in weights:  # FSDP2 gathers tensor by tensor: every rank takes part
                        pass
        if server:
            _barrier()  # other ranks must not sample before the server has the new weights
        if self.engine.mode == "colocate":
            self._timed("sleep", self.engine.sleep)
        if step_dir is not None and pushes and step_dir.exists():
            self._synced_dirs.append(step_dir)
            while len(self._synced_dirs) > self.keep_syncs:
                old = self._synced_dirs.pop(0)
                shutil.rmtree(old, ignore_errors=True)
                with contextlib.suppress(OSError):
                    old.parent.rmdir()  # colocate: <tag>_<version>/ once every rank removed its own
        self.last_sync_s = time.time() - t0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.close()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- colocate construction

_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_initial_model(model: nn.Module, path: Path, merge_lora: bool = True) -> Path:
    """The policy as a Hugging Face directory vLLM can load: ``config.json`` and safetensors
    weights (no tokenizer: the engine runs with ``skip_tokenizer_init``). LoRA is merged in unless
    ``merge_lora=False`` (adapter sync: the engine holds the base weights, the adapter comes apart)."""
    from ..modeling import unwrap

    with full_weights(model, merge_lora) as weights:
        save_weights(weights, path)
    unwrap(_peft_of(model)).config.save_pretrained(str(path))
    return path


def _needs_export(cfg: Any) -> bool:
    if cfg is None:
        return True
    from ..models import NAMED_MODELS

    return cfg.model.name == "tiny" or bool(cfg.model.gguf_file) or cfg.model.name in NAMED_MODELS


def make_colocate_engine(rollout: Any, model: nn.Module, cfg: Any, export_dir: Path, adapter: bool,
                         rank: int = 0, world: int = 1) -> ColocateEngine:
    """Start an in-process ``vllm.LLM`` for this training process (one engine per
    ``rollout.vllm_tensor_parallel_size`` processes, vLLM's ``external_launcher`` executor)."""
    try:
        from vllm import LLM  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - needs a GPU machine
        raise ImportError("rollout.backend=vllm needs vLLM (`pip install vllm`, CUDA only); use rollout.backend=hf "
                          "on CPU") from e
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: apply_model is local
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("LOCAL_RANK", "0"))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    path = str(export_initial_model(model, export_dir, merge_lora=not adapter)) if _needs_export(cfg) else cfg.model.name
    dtype = "auto"
    if cfg is not None:
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.train.mixed_precision, cfg.model.dtype)
        dtype = "auto" if dtype == "float32" else dtype
    tp = rollout.vllm_tensor_parallel_size
    kw: dict[str, Any] = dict(
        model=path, dtype=dtype, seed=rank // tp, tensor_parallel_size=tp,
        gpu_memory_utilization=rollout.vllm_gpu_memory_utilization, distributed_executor_backend="external_launcher",
        enable_sleep_mode=rollout.vllm_sleep, enforce_eager=rollout.vllm_enforce_eager, skip_tokenizer_init=True,
        max_model_len=rollout.vllm_max_model_len or None,
        trust_remote_code=bool(cfg.model.trust_remote_code) if cfg is not None else False,
    )
    if adapter:
        r = cfg.model.lora_r if cfg is not None else 64
        kw.update(enable_lora=True, max_loras=1, max_lora_rank=next((x for x in _LORA_RANKS if x >= r), r))
    return ColocateEngine(LLM(**kw), sleep=rollout.vllm_sleep)


@register_backend("vllm", "a vLLM engine, colocated on the training GPU or a server (GPU only; rollout.vllm_*)")
def build_vllm(rollout, model: nn.Module, pad_id: int, eos_id: int, *, cfg: Any = None, is_main_process: bool = True,
               engine: Any = None) -> VLLMBackend:
    return VLLMBackend.from_config(rollout, model, pad_id, eos_id, cfg=cfg, is_main_process=is_main_process,
                                   engine=engine)

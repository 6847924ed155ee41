"""Checkpoints: the model (or adapter) in Hugging Face format, plus the trainer state.

Layout of ``<output_dir>/checkpoints/step_<N>/``::

    model/              save_pretrained (safetensors) + tokenizer
    teacher_ema.safetensors   EMA teacher weights (teacher.kind=ema only)
    trainer_state.pt    optimizer, scheduler, step, RNG states (read back with weights_only=True)
    state.json          step, the resolved config, the fingerprint of the initial weights, summary
    manifest.json       size and sha256 of every other file (written last)

A checkpoint is written to ``step_<N>.tmp``, its files are flushed to disk, ``manifest.json`` is
written last, and the directory is renamed when complete, so a killed run never leaves a
half-written checkpoint under a final name. A failed write (disk full, ...) removes the ``.tmp``
directory and raises :class:`CheckpointError`; earlier checkpoints are untouched. Only the newest
``keep_last`` are kept (0 = all). Only directories named ``step_<digits>`` are checkpoints.

Resuming verifies the manifest (sizes and sha256): ``train.resume=latest`` falls back to the newest
checkpoint that verifies (saying which ones it skipped and why); an explicit checkpoint path that
fails is an error. Checkpoints without a manifest (written before manifests existed) are resumed
with a warning; a file of theirs that cannot be read is still an error naming the file. On resume
the config stored in ``state.json`` is compared with the new one (:func:`resume_config_changes`).

Every problem with a checkpoint is a :class:`CheckpointError`, a one-line message naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
SHARDED = "sharded"  # torch.distributed.checkpoint files of an FSDP2 run (optimizer, EMA teacher)
FORMAT = 2  # 1: no manifest, no config in state.json
STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read or used (one line; names the file or directory).

    A ``ValueError``, so the command line prints it as one ``error:`` line with exit code 1."""


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    """Every RNG the loop draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    st = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(_tuplify(st["python"]))
    name, keys, *rest = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------ helpers
def describe_failure(e: BaseException) -> str:
    """First line of an exception's message, without square brackets (the CLI prints with rich
    markup) and bounded in length."""
    lines = str(e).strip().splitlines()
    msg = lines[0].strip() if lines else ""
    msg = msg.replace("[", "(").replace("]", ")")
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def is_no_space(e: BaseException) -> bool:
    """Disk full or quota exceeded, however the writer reports it: ``OSError`` (ENOSPC/EDQUOT),
    safetensors' ``SafetensorError`` ("os error 28"), torch's "enforce fail at
    inline_container.cc ... unexpected pos" (a short write), possibly as the cause of another."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        s = str(e).lower()
        if ("no space left" in s or "os error 28" in s or "code: 28" in s or "storagefull" in s
                or "quota exceeded" in s or ("inline_container" in s and "unexpected pos" in s)):
            return True
        e = e.__cause__ or e.__context__
    return False


def is_file_too_large(e: BaseException) -> bool:
    """The process's file size limit (``ulimit -f``, EFBIG) stopped a write, possibly as the cause
    of another error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.EFBIG:
            return True
        s = str(e).lower()
        if "file too large" in s or "os error 27" in s:
            return True
        e = e.__cause__ or e.__context__
    return False


def _file_size_limit() -> int | None:
    """``ulimit -f`` in bytes, None when unlimited (or unknown)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return None if soft == resource.RLIM_INFINITY else soft
    except (ImportError, OSError, ValueError):
        return None


def write_failure(e: BaseException) -> str | None:
    """"no space left on device" / "the file size limit (ulimit -f ...) was reached" when ``e`` is
    one of those (a short write that could be either names both), else None."""
    if is_file_too_large(e):
        return "the file size limit (ulimit -f) was reached"
    if is_no_space(e):
        limit = _file_size_limit()
        return "no space left on device" + ("" if limit is None else f" or the file size limit (ulimit -f, {limit} bytes) reached")
    return None


def step_of(path: Path) -> int | None:
    """N for a directory named ``step_<N>`` (digits only), else None."""
    m = STEP_DIR.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (``checkpoints/step_<digits>``), oldest first by step."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and p.is_dir()]
    return sorted(found, key=lambda p: (step_of(p), p.name))


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (checkpoint manifests, the warm-start cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        pass
    finally:
        os.close(fd)


def weights_fingerprint(model) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``model``'s initial weights (LoRA
    adapter weights excluded: they are saved with every checkpoint, and their random
    initialisation depends on whether the warm start was built in the same process)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        if ".lora_" in k or k.startswith("lora_"):
            continue
        t = v.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(v.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


# ------------------------------------------------------------------------------------- saving
def write_manifest(ckpt: Path) -> None:
    """Size and sha256 of every file under ``ckpt`` (each flushed to disk first), then
    ``manifest.json`` itself."""
    ckpt = Path(ckpt)
    files = {}
    for p in sorted(q for q in ckpt.rglob("*") if q.is_file()):
        rel = p.relative_to(ckpt).as_posix()
        if rel == MANIFEST:
            continue
        _fsync(p)
        files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    for d in sorted(q for q in ckpt.rglob("*") if q.is_dir()):
        _fsync(d)  # their entries
    mp = ckpt / MANIFEST
    with open(mp, "w") as f:
        f.write(json.dumps({"format": FORMAT, "files": files}, indent=1))
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, teacher, keep_last: int = 2,
                    extra: dict | None = None, state_dict: dict | None = None, sharded_dir: Path | None = None,
                    rng_ranks: list | None = None) -> Path:
    """Write ``checkpoints/step_<step>`` atomically; keep the newest ``keep_last`` (0 = all).

    Several processes: ``rng_ranks`` holds every rank's RNG state (rank order). FSDP2
    (``ogls_sd.sharding``): ``state_dict`` is the gathered full model (written as Hugging Face
    safetensors instead of the model's own, sharded, tensors), and ``sharded_dir`` a directory
    ``torch.distributed.checkpoint`` wrote with the optimizer (and EMA teacher) shards; it is moved
    in as ``sharded/``, and ``trainer_state.pt`` then has ``optimizer: None``.

    Raises :class:`CheckpointError` (the ``.tmp`` directory removed, earlier checkpoints kept)
    when writing fails, e.g. "no space left on device"."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        if state_dict is not None:
            model.save_pretrained(tmp / "model", state_dict=state_dict)
        elif hasattr(model, "peft_config"):  # the adapter only; LoRA never trains the embeddings (no base lookup)
            model.save_pretrained(tmp / "model", save_embedding_layers=False)
        else:
            model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        if extra and isinstance(extra.get("config"), dict):  # a model card (also what `ogls-sd push` uploads)
            from .hub import model_card

            (tmp / "model" / "README.md").write_text(
                model_card(Path(run_dir).resolve().name, step, extra["config"], extra.get("summary")))
        # FSDP2: a teacher copy's EMA is in the shards (sharded_dir); a LoRA adapter EMA is replicated
        ema = teacher.state_dict() if teacher is not None and (sharded_dir is None or teacher.copy is None) else None
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, tmp / "teacher_ema.safetensors")
        if sharded_dir is not None:
            shutil.move(str(sharded_dir), str(tmp / SHARDED))
        torch.save({
            "optimizer": optimizer.state_dict() if sharded_dir is None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "step": step,
            "rng": rng_state(),
            **({"rng_ranks": rng_ranks} if rng_ranks is not None else {}),
        }, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "step": step, **(extra or {})}, indent=1))
        write_manifest(tmp)  # last: a manifest means every file above is complete
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = [p for p in checkpoint_dirs(run_dir) if p != final]
        kept = f"; the previous checkpoint {prev[-1]} is kept" if prev else ""
        why = write_failure(e)
        if why is not None:
            raise CheckpointError(f"writing checkpoint {final}: {why}; the partial {tmp.name} was removed{kept}. Free "
                                  "disk space (or raise the limit) and resume with --resume latest") from e
        raise CheckpointError(f"writing checkpoint {final} failed ({describe_failure(e)}); the partial {tmp.name} was "
                              f"removed{kept}") from e
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync(root)
    _rotate(run_dir, final, keep_last)
    return final


def _rotate(run_dir: Path, final: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints up to ``final`` (0 = keep all). ``final`` is never
    deleted; nor are checkpoints of later steps (a run resumed from an older checkpoint because
    the newer ones failed verification overwrites those as it reaches them)."""
    if keep_last <= 0:
        return
    s = step_of(final)
    done = [p for p in checkpoint_dirs(run_dir) if step_of(p) <= s and p != final]
    for old in done[: max(0, len(done) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------ reading
@contextlib.contextmanager
def _reading(path: Path, what: str = "") -> Iterator[None]:
    """Turn any failure to read ``path`` into a one-line :class:`CheckpointError` naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing{what}") from e
    except Exception as e:  # SafetensorError, pickle/zip errors, EOFError, JSON errors, ...
        raise CheckpointError(f"{path}: unreadable{what} ({describe_failure(e)})") from e


def _required(ckpt: Path) -> list[str]:
    """Files every checkpoint must hold (relative paths); model weights are checked separately."""
    return ["state.json", "trainer_state.pt"]


def manifest_files(ckpt: Path) -> dict | None:
    """The manifest's ``{relative path: {size, sha256}}``; None for a checkpoint written before
    manifests existed (format 1). A missing manifest in a checkpoint whose ``state.json`` says
    format 2 or later is an error: it was deleted, and the files can no longer be verified."""
    ckpt = Path(ckpt)
    mp = ckpt / MANIFEST
    if not mp.is_file():
        st = ckpt / "state.json"
        try:
            fmt = json.loads(st.read_text()).get("format", 1)
        except Exception:  # unreadable: reported by whoever reads it (read_state)
            fmt = 1
        if fmt != 1:
            raise CheckpointError(f"{mp}: missing, although {st} says format {fmt} (written with a manifest): the "
                                  "checkpoint's files cannot be verified")
        return None
    with _reading(mp):
        files = json.loads(mp.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    return files


def verify_checkpoint(ckpt: Path) -> bool:
    """Check ``ckpt`` against its manifest (every listed file present with its size and sha256)
    and that the required files are there. Returns True when a manifest was verified, False for
    a checkpoint without one (older format: only the required files were checked). Raises
    :class:`CheckpointError` with the reason."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a directory")
    for rel in _required(ckpt):
        if not (ckpt / rel).is_file():
            raise CheckpointError(f"{ckpt / rel}: missing (not a complete checkpoint)")
    mdir = ckpt / "model"
    if not (mdir.is_dir() and any(mdir.glob("*.safetensors"))):
        raise CheckpointError(f"{mdir}: no *.safetensors weights")
    files = manifest_files(ckpt)
    if files is None:
        return False
    mp = ckpt / MANIFEST
    for rel in _required(ckpt):
        if rel not in files:
            raise CheckpointError(f"{mp}: does not list {rel}")
    for rel, meta in files.items():
        p = ckpt / rel
        if not isinstance(meta, dict):
            raise CheckpointError(f"{mp}: the entry for {rel} is not a mapping with size and sha256")
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {MANIFEST})")
        size = p.stat().st_size
        if size != meta.get("size"):
            raise CheckpointError(f"{p}: {size} bytes, {MANIFEST} says {meta.get('size')} (truncated or overwritten)")
        if sha256_file(p) != meta.get("sha256"):
            raise CheckpointError(f"{p}: sha256 differs from {MANIFEST} (the file changed after it was written)")
    return True


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoints/step_<digits>`` directory (not verified)."""
    done = checkpoint_dirs(run_dir)
    return done[-1] if done else None


def no_checkpoint_to_resume(run_dir: Path) -> str:
    """What ``--resume latest`` says when the run has no checkpoint yet: it starts from step 0
    (a run killed before its first ``train.save_every`` steps restarts), never silently."""
    return (f"--resume latest: no checkpoint in {Path(run_dir) / 'checkpoints'}: starting from step 0 (a fresh run "
            "in this directory)")


def resolve_resume(run_dir: Path, resume: str, warn: Callable[[str], None] | None = None) -> Path | None:
    """``resume`` is '' (no resume), 'latest' (the newest checkpoint of the run that verifies; None
    if the run has none; each newer one that fails is skipped with a warning), or a checkpoint
    path (an error if it fails verification). Checkpoints without a manifest pass with a warning."""
    warn = warn or (lambda msg: None)
    if not resume:
        return None
    if resume == "latest":
        cands = checkpoint_dirs(run_dir)
        if not cands:
            warn(no_checkpoint_to_resume(run_dir))
            return None
        reasons = []
        for p in reversed(cands):
            try:
                if not verify_checkpoint(p):
                    warn(f"{p} has no {MANIFEST} (written by an older version): its files cannot be verified")
                if reasons:
                    warn(f"resuming from {p.name}, the newest checkpoint that verifies")
                return p
            except CheckpointError as e:
                warn(f"skipping checkpoint {p.name}: {e}")
                reasons.append(f"{p.name}: {e}")
        raise CheckpointError(f"--resume latest: no checkpoint in {Path(run_dir) / 'checkpoints'} verifies ("
                              + "; ".join(reasons) + ")")
    p = Path(resume)
    if not p.is_dir() or not ((p / "state.json").is_file() or (p / "trainer_state.pt").is_file()):
        raise CheckpointError(f"--resume {resume}: not a checkpoint directory (no state.json or trainer_state.pt)")
    try:
        if not verify_checkpoint(p):
            warn(f"{p} has no {MANIFEST} (written by an older version): its files cannot be verified")
    except CheckpointError as e:
        raise CheckpointError(f"--resume {resume}: {e}") from None
    return p


def read_state(ckpt: Path) -> dict:
    """``state.json`` of a checkpoint (step, config, initial-weights fingerprint, summary)."""
    p = Path(ckpt) / "state.json"
    with _reading(p):
        st = json.loads(p.read_text())
        if not isinstance(st, dict):
            raise TypeError("not a JSON object")
        st["step"] = int(st["step"])
    return st


def saved_world_size(state: dict) -> int:
    """The number of processes that wrote a trainer state: every rank's RNG state is recorded
    (``rng_ranks``) when there were several, none when there was one."""
    ranks = state.get("rng_ranks")
    return len(ranks) if isinstance(ranks, list) else 1


def rank_rng(state: dict, rank: int, world_size: int) -> dict:
    """This rank's RNG state from a trainer state: its own when the checkpoint recorded every
    rank's (same number of processes), else the one saved (rank 0's)."""
    ranks = state.get("rng_ranks")
    if isinstance(ranks, list) and len(ranks) == world_size:
        return ranks[rank]
    return state["rng"]


def load_trainer_state(ckpt: Path) -> dict:
    p = Path(ckpt) / "trainer_state.pt"
    with _reading(p):
        st = torch.load(p, weights_only=True)
        if not isinstance(st, dict) or not {"optimizer", "step", "rng"} <= set(st):
            raise TypeError("not a trainer state (expected optimizer, step, rng)")
    return st


def load_ema(ckpt: Path, required: bool = False) -> dict | None:
    """The EMA teacher weights; None when the checkpoint has none, unless ``required`` (then an
    error naming the file: a run with teacher.kind=ema must not silently restart its EMA)."""
    p = Path(ckpt) / "teacher_ema.safetensors"
    if not p.is_file():
        if required:
            raise CheckpointError(f"{p}: missing; teacher.kind=ema needs the EMA teacher state to resume exactly")
        return None
    with _reading(p):
        return load_file(p)


def model_weight_files(ckpt: Path) -> list[Path]:
    """The ``model/*.safetensors`` files to load: exactly those the manifest lists (a stray
    ``model_old.safetensors`` is never read); every one there for a checkpoint without a manifest."""
    mdir = Path(ckpt) / "model"
    listed = manifest_files(ckpt)
    if listed is None:
        files = sorted(mdir.glob("*.safetensors"))
    else:
        files = [Path(ckpt) / rel for rel in sorted(listed)
                 if rel.startswith("model/") and rel.count("/") == 1 and rel.endswith(".safetensors")]
    if not files:
        raise CheckpointError(f"{mdir}: no *.safetensors weights" + ("" if listed is None else f" listed in {MANIFEST}"))
    return files


def load_model_weights(ckpt: Path, model) -> None:
    """Load the checkpoint's weights into ``model`` in place (full model or peft adapter)."""
    mdir = Path(ckpt) / "model"
    files = model_weight_files(Path(ckpt))
    adapter = mdir / "adapter_model.safetensors"
    if adapter in files:
        from peft import set_peft_model_state_dict

        with _reading(adapter):
            sd = load_file(adapter)
        res = set_peft_model_state_dict(model, sd)
        if getattr(res, "unexpected_keys", None):
            raise CheckpointError(f"{adapter}: unexpected adapter keys {', '.join(res.unexpected_keys[:5])}")
        return
    from .modeling import unwrap

    target = unwrap(model)
    sd = {}
    for f in files:
        with _reading(f):
            sd.update(load_file(f))
    try:
        missing, unexpected = target.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{mdir}: weights do not match the model ({describe_failure(e)})") from e
    tied = set(getattr(target, "_tied_weights_keys", None) or [])
    if isinstance(getattr(target, "_tied_weights_keys", None), dict):
        tied = set(target._tied_weights_keys)
    bad_missing = [k for k in missing if k not in tied]
    if unexpected or bad_missing:
        raise CheckpointError(f"{mdir}: weights do not match the model (missing {', '.join(bad_missing[:5]) or 'none'}; "
                              f"unexpected {', '.join(unexpected[:5]) or 'none'})")


@contextlib.contextmanager
def restoring(path: Path, what: str) -> Iterator[None]:
    """Loading saved state into live objects (optimizer, scheduler, EMA teacher): a mismatch is a
    one-line :class:`CheckpointError` naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: the {what} does not match this run ({describe_failure(e)})") from e


# ------------------------------------------------------------------------ resume config checks
# Fields that may differ between a run and its resume without changing the training trajectory
# (bookkeeping, locations, timeouts, evaluation, logging). Everything else must be unchanged.
RESUME_MUTABLE = frozenset({
    "train.steps",  # upward only (checked against the checkpoint's step)
    "train.save_every", "train.keep_last", "train.report_to", "train.output_dir", "train.resume",
    "train.reflection_markers", "train.log_completions", "train.log_completions_prompts",  # logging only
    "train.max_nonfinite_steps",  # when to give up; changes no update
    "train.push_to_hub", "train.hub_private",  # where the result goes
    "warmstart.cache_dir",  # a location: the initial weights themselves are checked by fingerprint
    "rollout.vllm_timeout_s", "rollout.vllm_sync_dir",  # a time limit, a location
})
RESUME_MUTABLE_SECTIONS = frozenset({"eval"})
RESUME_NOT_RECORDED = frozenset({"train.resume"})  # always differs on resume


def resume_mutable(key: str) -> bool:
    return key in RESUME_MUTABLE or key.split(".", 1)[0] in RESUME_MUTABLE_SECTIONS


def _flat(d: dict) -> dict:
    return {f"{s}.{k}": v for s, sec in d.items() if isinstance(sec, dict) for k, v in sec.items()}


def resume_config_changes(old: dict, new: dict, defaults: dict | None = None) -> dict[str, tuple]:
    """``{key: (old, new)}`` for every config field that differs between the checkpoint's config
    ``old`` and ``new`` (a field unknown to ``old`` counts as its default in ``defaults``)."""
    fo, fn, fd = _flat(old), _flat(new), _flat(defaults or {})
    out = {}
    for k, v in fn.items():
        o = fo.get(k, fd.get(k, v))
        if o != v:
            out[k] = (o, v)
    return out


def _show(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def check_resume_config(ckpt: Path, old: dict | None, new: dict, defaults: dict | None = None) -> dict[str, tuple]:
    """Refuse a resume whose config changes a field outside :data:`RESUME_MUTABLE` (one line listing
    every changed key, old -> new). Returns the allowed changes (to be recorded)."""
    changes = resume_config_changes(old or {}, new, defaults) if old is not None else {}
    bad = {k: v for k, v in changes.items() if not resume_mutable(k)}
    if bad:
        listed = ", ".join(f"{k}: {_show(o)} -> {_show(n)}" for k, (o, n) in bad.items())
        raise CheckpointError(
            f"--resume {ckpt}: changed settings would break the exact continuation of the run ({listed}); resume with "
            "the original values, or start a new run (another train.output_dir)")
    return {k: v for k, v in changes.items() if k not in RESUME_NOT_RECORDED}

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from ogls_sd.config import Config
from ogls_sd.tiny import char_tokenizer, tiny_llama

# Small enough that a whole training step takes well under a second.
TINY_OVERRIDES = [
    "model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "model.tiny_intermediate=64",
    "rollout.max_new_tokens=12", "rollout.num_generations=4", "train.prompts_per_step=2",
    "data.eval_size=4", "eval.max_new_tokens=12", "warmstart.steps=2", "warmstart.batch_size=8", "warmstart.check_size=4",
    "train.steps=1", "steering.max_contexts=2",
]


@pytest.fixture
def tok():
    return char_tokenizer()


def peaked_tiny_llama(tok):
    """The tiny test model (seed 0), with larger weights than the default init, so that
    distributions are peaked and differ between contexts: losses are then far above float32
    rounding. Also used outside pytest (tests/_dp_worker.py)."""
    torch.manual_seed(0)
    m = tiny_llama(len(tok), hidden=32, layers=1, heads=2, intermediate=64,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return m


@pytest.fixture
def tiny_model(tok):
    return peaked_tiny_llama(tok)


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra: str) -> Config:
        return Config.load(None, TINY_OVERRIDES + [f"warmstart.cache_dir={tmp_path / 'ws'}",
                                                   f"train.output_dir={tmp_path / 'run'}", *extra])
    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention (and stall badly on a busy 2-core box).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


VERIFIER_TIMEOUT = 2.0  # per-item deadline of the verifier the tests share


@pytest.fixture(scope="module")
def verifier():
    """A verifier with two workers and a short deadline, closed after the module."""
    from ogls_sd.rewards.verifier import Verifier

    v = Verifier(timeout=VERIFIER_TIMEOUT, max_workers=2)
    yield v
    v.close()


"""The one-process parallelism strategy (ogls_sd.parallel) against a naive float64 reference; the
data-parallel and FSDP2 strategies run with real processes in test_data_parallel.py / test_fsdp.py."""

import math

import pytest
import torch
from accelerate import Accelerator

from ogls_sd.parallel import FSDP2, DataParallel, SingleProcess, choose_parallelism, for_sharding
from ogls_sd.resume import Resume


@pytest.fixture
def accel():
    return Accelerator(cpu=True)


def _params(seed: int, scale: float = 1.0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64)) for shape in [(3, 4), (5,), (2, 2, 2)]]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
    return ps


def _naive_norm(ps) -> float:
    return math.sqrt(sum(float(x) ** 2 for p in ps for x in p.grad.reshape(-1).tolist()))


def test_one_process_is_chosen_and_writes(accel):
    par = choose_parallelism(accel, False)
    assert type(par) is SingleProcess and not isinstance(par, DataParallel)
    assert (par.rank, par.world_size, par.is_main, par.sharded) == (0, 1, True, False)
    assert type(for_sharding(accel, None)) is SingleProcess
    with par.step_scope():  # no gathering: a plain scope
        pass
    assert par.ema_in_shards(object()) is False
    assert not issubclass(SingleProcess, FSDP2)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_norm", [0.0, 0.3, 1e6])
def test_reduce_and_clip_matches_a_naive_reference(accel, seed, max_norm):
    ps = _params(seed)
    before = [p.grad.clone() for p in ps]
    norm = _naive_norm(ps)
    gn = SingleProcess(accel).reduce_and_clip(ps, True, max_norm)
    assert gn == pytest.approx(norm, rel=1e-12)
    if 0 < max_norm < norm:  # clipped to max_norm, direction kept
        assert _naive_norm(ps) == pytest.approx(max_norm, rel=1e-5)
        for p, b in zip(ps, before):
            torch.testing.assert_close(p.grad, b * (max_norm / norm), rtol=1e-5, atol=0)
    else:  # no clipping: the gradients are untouched
        for p, b in zip(ps, before):
            assert torch.equal(p.grad, b)


def test_a_non_finite_pass_or_norm_is_reported_as_none(accel):
    par = SingleProcess(accel)
    assert par.reduce_and_clip(_params(0), False, 1.0) is None  # the micro-batch loop hit a non-finite loss
    ps = _params(1)
    ps[1].grad[2] = float("inf")
    assert par.reduce_and_clip(ps, True, 0.0) is None


def test_one_process_checkpoint_has_no_parallel_parts(accel, tmp_path):
    seen = []
    out = SingleProcess(accel).save_checkpoint(tmp_path / "step_000001", lambda **kw: seen.append(kw) or tmp_path, None, None)
    assert out == tmp_path and seen == [{}]


def test_a_fresh_run_has_nothing_to_resume(tmp_path):
    r = Resume()
    assert not r.active and r.finished(tmp_path, None) is None
    r.check_world_size(3)  # nothing recorded: no check
    r.check_initial_weights({"sha256": "x"})

"""The approximator's pairs shared among worker threads: same answers, settings left alone."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from pybivi.cme._parallel import chunk_bounds
from pybivi.cme.approximator import DEFAULT_WEIGHTS, load_approximator
from pybivi.cme.mixture import _BLOCK
from pybivi.cme.regions import B_SMALL


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n_items", [0, 1, _BLOCK - 1, _BLOCK, 3 * _BLOCK + 5, 10 * _BLOCK])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_chunks_cover_the_pairs_once_on_block_boundaries(n_items, workers):
    chunks = chunk_bounds(n_items, workers, _BLOCK)
    assert len(chunks) <= max(1, workers)
    assert chunks[0].start == 0 and chunks[-1].stop == n_items
    for left, right in zip(chunks, chunks[1:], strict=False):
        assert left.stop == right.start and left.start % _BLOCK == 0
        assert (left.stop - left.start) % _BLOCK == 0  # only the last chunk may be ragged


def _pairs(count: int, seed: int):
    """In-domain pairs plus a known number of out-of-domain ones (b = 1e4) spread over chunks."""
    gen = torch.Generator().manual_seed(seed)

    def loguniform(lo, hi):
        return 10 ** (torch.rand(count, generator=gen) * (hi - lo) + lo)

    b, beta, gamma = loguniform(-1, 1.5), loguniform(-1, 0.7), loguniform(-1, 0.7)
    n = torch.poisson(b / beta, generator=gen)
    m = torch.poisson(b / gamma, generator=gen)
    outside = torch.arange(0, count, count // 9)  # nine pairs, in every chunk
    b[outside] = 1e4
    return n, m, b, beta, gamma, len(outside)


def _value_and_grads(approx, n, m, b, beta, gamma):
    leaves = [x.clone().requires_grad_(True) for x in (b, beta, gamma)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = approx.log_prob_mature_given_nascent(n, m, *leaves)
    out.sum().backward()
    messages = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    return out.detach(), [x.grad for x in leaves], messages


def test_worker_threads_give_the_single_thread_answer():
    """Values, per-pair gradients and the domain tally do not depend on the thread count."""
    n, m, b, beta, gamma, n_outside = _pairs(3 * _BLOCK + 1234, seed=3)
    answers = {}
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        approx = load_approximator(DEFAULT_WEIGHTS)  # fresh object: its own tally
        answers[threads] = _value_and_grads(approx, n, m, b, beta, gamma)
        assert approx.outside_count == n_outside
    value, grads, messages = answers[1]
    assert torch.isfinite(value).all() and all(torch.isfinite(g).all() for g in grads)
    assert len(messages) == 1 and messages[0].startswith(f"{n_outside} of {len(n)}")
    for threads in (2, 3):
        other_value, other_grads, other_messages = answers[threads]
        # chunks keep the sequential block boundaries: the values are bit for bit the same;
        # the gradients' input graph runs per chunk and may round differently in the last bit
        assert torch.equal(other_value, value)
        for g, h in zip(other_grads, grads, strict=True):
            torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-6)
        assert other_messages == messages
    # values alone (no gradient wanted: the other code path), in the workers too
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alone = load_approximator(DEFAULT_WEIGHTS).log_prob_mature_given_nascent(
                n, m, b, beta, gamma
            )
        assert not alone.requires_grad
        torch.testing.assert_close(alone, value, rtol=1e-6, atol=1e-6)


def test_worker_threads_leave_the_callers_thread_settings_alone():
    n, m, b, beta, gamma, _ = _pairs(2 * _BLOCK + 10, seed=4)
    torch.set_num_threads(2)
    approx = load_approximator(DEFAULT_WEIGHTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _value_and_grads(approx, n, m, b, beta, gamma)
    assert torch.get_num_threads() == 2
    seen = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert seen == [2]  # threads started later still inherit the process default


def test_domain_tally_follows_the_documented_rule():
    """Outside = a log-parameter outside the box, n above the cap, or mean + 10 sd of either
    species above the cap (computed here in float64 from the closed-form moments)."""
    from pybivi.cme.domain import BOX, STATE_CAP

    gen = torch.Generator().manual_seed(11)
    count = 4000
    b, beta, gamma = (10 ** (torch.rand(count, generator=gen) * 8 - 4) for _ in range(3))
    n = torch.randint(0, 3 * STATE_CAP, (count,), generator=gen).float()
    approx = load_approximator(DEFAULT_WEIGHTS)
    got, small = approx._count_outside(n, b, beta, gamma)
    b64, beta64, gamma64 = (x.double() for x in (b, beta, gamma))
    outside = n > STATE_CAP
    for x, key in ((b64, "log10_b"), (beta64, "log10_beta"), (gamma64, "log10_gamma")):
        lo, hi = BOX[key]
        outside |= (torch.log10(x) < lo) | (torch.log10(x) > hi)
    mean_n, mean_m = b64 / beta64, b64 / gamma64
    var_n = mean_n * (1 + b64)
    var_m = mean_m * (1 + b64 * beta64 / (beta64 + gamma64))
    outside |= mean_n + 10 * var_n.sqrt() > STATE_CAP
    outside |= mean_m + 10 * var_m.sqrt() > STATE_CAP
    assert 0 < got < count
    assert abs(got - int(outside.sum())) <= 2  # float32 rounding at the boundaries
    assert small == int((b < B_SMALL).sum())

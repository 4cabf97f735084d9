"""Train the bursty conditional approximator from exact CME solutions.

Entry points: :func:`train_approximator` (Python) and :func:`main` (``pybivi approximator
train``). Training minimises ``sum_n P(n) KL(P(. | n) || Phat(. | n))`` averaged over
parameter sets, which is exactly the joint ``KL(P || NB x Phat)`` by which the
approximator's accuracy is measured (the nascent marginal is exact).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pybivi.cme.approximator import load_approximator, save_approximator
from pybivi.cme.domain import BOX, STATE_CAP
from pybivi.cme.mixture import nb_mixture_log_prob
from pybivi.cme.moments import moment_base
from pybivi.cme.network import ConditionalNet
from pybivi.cme.scoring import HELDOUT_SEED, SCORE_ROWS, LogProbFn, score, summarize
from pybivi.cme.training_data import ConditionalSet, build_dataset, design


def _pair_tensors(cs: ConditionalSet) -> dict[str, torch.Tensor]:
    idx, m, p = cs.pairs()
    par = cs.params[cs.cond_design]
    return {
        "pair_cond": torch.from_numpy(idx),
        "m": torch.from_numpy(m.astype(np.float32)),
        "p": torch.from_numpy(p),
        "logp": torch.from_numpy(np.log(np.maximum(p, 1e-300))),
        "n": torch.from_numpy(cs.cond_n.astype(np.float32)),
        "b": torch.from_numpy(par[:, 0].astype(np.float32)),
        "beta": torch.from_numpy(par[:, 1].astype(np.float32)),
        "gamma": torch.from_numpy(par[:, 2].astype(np.float32)),
        "w": torch.from_numpy(cs.cond_weight),
    }


def conditional_log_prob(net: ConditionalNet, n, b, beta, gamma, pair_cond, m) -> torch.Tensor:
    """``log Phat(m | n)`` for pairs indexing per-conditional parameters (training layout)."""
    c, sigma = moment_base(n, b, beta, gamma, net.moment_slope)
    feats = net.features(n, torch.log(b), torch.log(beta), torch.log(gamma), c, sigma)
    log_means, logw, log_r = net.heads(feats, c, sigma)
    return nb_mixture_log_prob(m, log_means[:, pair_cond], logw[:, pair_cond], log_r[pair_cond])


def fit(
    net: ConditionalNet,
    cs: ConditionalSet,
    epochs: int,
    lr: float = 3e-3,
    pairs_per_batch: int = 1 << 14,
    seed: int = 0,
    log: Callable[[str], None] = print,
    time_limit: float | None = None,
    hard_power: float = 0.0,
    hard_cap: float = 10.0,
) -> list[float]:
    """Adam on the weighted conditional KL; returns the mean joint KL of each epoch.

    Conditionals are shuffled once and cut into contiguous batches of about
    ``pairs_per_batch`` (n, m) pairs; the batch order is reshuffled every epoch. The
    learning rate follows a cosine from ``lr`` to ``lr / 30``.

    With ``hard_power != 0`` the loss weights each design by ``(KL_d / mean KL)**hard_power``
    (normalised to mean 1, clipped to ``[1 / hard_cap, hard_cap]`` before normalising),
    where ``KL_d`` is the design's joint KL accumulated over the previous epoch (the first
    epoch is unweighted). A positive power moves capacity from easy designs to the hard
    large-burst ones; a negative one moves it away from the hardest few, which the plain
    mean KL lets dominate, to typical designs. The returned history stays unweighted.
    """
    gen = torch.Generator().manual_seed(seed)
    t = _pair_tensors(cs)
    n_cond = len(t["n"])
    perm = torch.randperm(n_cond, generator=gen)
    # Reorder conditionals so that a batch is a contiguous range of pairs.
    lens = torch.from_numpy(cs.cond_len)[perm]
    starts = torch.from_numpy(cs.cond_start)[perm]
    spans = zip(starts.tolist(), lens.tolist(), strict=True)
    pair_order = torch.cat([torch.arange(s, s + n) for s, n in spans])
    new_cond = torch.repeat_interleave(torch.arange(n_cond), lens)
    m_all, logp_all, p_all = t["m"][pair_order], t["logp"][pair_order], t["p"][pair_order]
    cond = {k: t[k][perm] for k in ("n", "b", "beta", "gamma", "w")}
    cond_design = torch.from_numpy(cs.cond_design)[perm]
    cum = torch.cumsum(lens, 0)
    bounds = [0]
    while bounds[-1] < n_cond:
        target = (cum[bounds[-1] - 1] if bounds[-1] else 0) + pairs_per_batch
        bounds.append(max(bounds[-1] + 1, int(torch.searchsorted(cum, target)) + 1))
    bounds[-1] = n_cond
    batches = list(zip(bounds[:-1], bounds[1:], strict=True))
    n_designs = len(cs.params)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    total_steps = epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (1 + 29 * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))) / 30,
    )
    history, t0 = [], time.time()
    design_weight = torch.ones(n_designs)
    for epoch in range(epochs):
        order = torch.randperm(len(batches), generator=gen).tolist()
        kl_design = torch.zeros(n_designs, dtype=torch.float64)
        for bi in order:
            c0, c1 = batches[bi]
            p0 = int(cum[c0 - 1]) if c0 else 0
            p1 = int(cum[c1 - 1])
            pc = new_cond[p0:p1] - c0
            logq = conditional_log_prob(
                net,
                cond["n"][c0:c1],
                cond["b"][c0:c1],
                cond["beta"][c0:c1],
                cond["gamma"][c0:c1],
                pc,
                m_all[p0:p1],
            )
            wp = (cond["w"][c0:c1][pc] * p_all[p0:p1]).float()
            terms = wp * (logp_all[p0:p1].float() - logq)
            pair_design = cond_design[c0:c1][pc]
            weighted = terms * design_weight[pair_design] if hard_power != 0.0 else terms
            loss = weighted.sum() / n_designs
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            kl_design.index_add_(0, pair_design, terms.detach().double())
        total = float(kl_design.sum()) / n_designs
        history.append(total)
        if hard_power != 0.0:
            design_weight = _hardness_weights(kl_design, hard_power, hard_cap)
        log(f"epoch {epoch + 1}/{epochs}: mean joint KL {total:.3e} ({time.time() - t0:.0f} s)")
        if time_limit is not None and time.time() - t0 > time_limit:
            log("time limit reached; stopping")
            break
    return history


def _hardness_weights(kl_design: torch.Tensor, power: float, cap: float) -> torch.Tensor:
    """Design weights ``(KL_d / mean)**power``, clipped to ``[1/cap, cap]``, mean 1 (float32)."""
    rel = kl_design.clamp(min=0.0) / kl_design.clamp(min=0.0).mean().clamp(min=1e-300)
    w = rel.clamp(min=1e-30).pow(power).clamp(1.0 / cap, cap)
    return (w / w.mean()).float()


def _net_log_prob(net: ConditionalNet) -> LogProbFn:
    def f(n, m, b, beta, gamma):
        idx = torch.arange(len(n))
        return conditional_log_prob(
            net, n.float(), b.float(), beta.float(), gamma.float(), idx, m.float()
        )

    return f


def training_command(**options) -> str:
    """The ``pybivi approximator train`` command line that passes these options.

    ``--out`` is left out (the default writes the shipped folder) and so are options set
    to ``None``; every other option is spelled out, so the line recorded in a weights
    file's metadata does not depend on the defaults of the version that reads it.
    """
    args = [f"--{k.replace('_', '-')} {v}" for k, v in options.items() if v is not None]
    return " ".join(["pybivi approximator train", *args])


def _exact_datasets(
    cache: Path,
    seed: int,
    designs: tuple[int, int],
    large_burst: tuple[int, int],
    n_heldout: int,
    state_cap: int,
    workers: int,
    log: Callable[[str], None],
) -> tuple[ConditionalSet, ConditionalSet]:
    """Exact conditionals for training and held-out scoring, built or read from ``cache``.

    ``designs`` and ``large_burst`` are (parameter sets, nascent rows per set) of the
    domain-wide Sobol design (seed ``seed``) and of the extra ``b >= 1`` one (seed
    ``seed + 1``); the held-out sets are drawn uniformly with :data:`HELDOUT_SEED`.
    """
    (n_designs, n_rows), (n_large_burst, large_rows) = designs, large_burst
    tag = "" if state_cap == STATE_CAP else f"_cap{state_cap}"
    params = design(n_designs, seed, cap=state_cap)
    train = build_dataset(
        params,
        cache / f"train_s{seed}_d{n_designs}_r{n_rows}{tag}",
        n_rows,
        workers=workers,
        log=log,
    )
    if n_large_burst:
        large_box = {**BOX, "log10_b": (0.0, BOX["log10_b"][1])}
        extra = design(n_large_burst, seed + 1, box=large_box, cap=state_cap)
        large = build_dataset(
            extra,
            cache / f"train_s{seed}_large{n_large_burst}_r{large_rows}{tag}",
            large_rows,
            workers=workers,
            log=log,
        )
        train = ConditionalSet.concat([train, large])
    held_params = design(n_heldout, HELDOUT_SEED, sobol=False, cap=state_cap)
    held = build_dataset(
        held_params,
        cache / f"heldout_domain_d{n_heldout}_r{SCORE_ROWS}{tag}",
        SCORE_ROWS,
        workers=workers,
        log=log,
        extras=False,
    )
    return train, held


def train_approximator(
    out_dir: str | Path,
    seed: int = 0,
    n_designs: int = 1024,
    n_heldout: int = 500,
    n_large_burst: int = 2048,
    epochs: int = 90,
    n_rows: int = 24,
    n_kernels: int = 14,
    width: int = 40,
    depth: int = 2,
    cache_dir: str | Path = ".cache/approximator",
    workers: int = 2,
    threads: int = 1,
    time_limit: float | None = None,
    state_cap: int = STATE_CAP,
    lr: float = 3e-3,
    activation: str = "relu",
    moment_slope: str = "gamma",
    pairs_per_batch: int = 1 << 14,
    hard_power: float = -0.3,
    hard_cap: float = 10.0,
    n_large_rows: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Regenerate the approximator weights from scratch: exact data, training, scoring.

    Parameters
    ----------
    out_dir
        Folder for ``bursty_conditional.pt`` and ``bursty_conditional.json``.
    seed
        Seed of the Sobol design and of the network initialisation and batching.
    n_designs, n_heldout
        Training parameter sets and held-out parameter sets (drawn uniformly with a
        different seed) inside the domain.
    n_large_burst
        Extra training parameter sets with ``b >= 1`` (Sobol, seed ``seed + 1``): large
        bursts give the least regular conditionals and the state cap thins them out.
    epochs, n_rows, n_kernels, width, depth, lr, activation, moment_slope
        Training length, nascent rows kept per design, network shape, Adam step size,
        hidden activation and the moment match placing the kernels (see
        :class:`~pybivi.cme.network.ConditionalNet`).
    cache_dir
        Where exact solutions are cached (resumable; outside git).
    workers, threads
        Processes for the exact solver, and torch threads for training (one thread is
        fastest on a shared machine: with more, torch's threads wait for each other).
    time_limit
        Stop training after this many seconds (the weights are still written).
    state_cap
        State cap of the domain (see :mod:`pybivi.cme.domain`); smaller values give a
        quick toy run.
    pairs_per_batch
        About this many (n, m) pairs per Adam step (smaller: more steps per epoch at
        about the same cost per epoch).
    hard_power, hard_cap
        Weight each design's KL in the loss by ``(KL_d / mean KL)**hard_power`` from the
        previous epoch, clipped to ``[1 / hard_cap, hard_cap]`` (see :func:`fit`); 0 is
        the plain mean joint KL, a negative power favours typical designs over the hardest
        (with the plain mean, the few hardest large-burst designs take capacity that the
        rest of biVI's box needs). The shipped weights use -0.3; docs/benchmarks.md
        compares 0, -0.3, -0.5 and -1.
    n_large_rows
        Nascent rows kept per ``b >= 1`` design (default ``n_rows``): their conditionals
        change fastest with ``n``.

    Returns
    -------
    Path
        The written weights file; its metadata records domain, design size, seed, wall
        time, held-out metrics and the SHA-256.
    """
    # Every option as passed (locals() holds only the parameters here): the command line
    # recorded in the metadata regenerates this file.
    options = {k: v for k, v in locals().items() if k not in ("out_dir", "log")}
    command = training_command(cache=options.pop("cache_dir"), **options)
    t0 = time.time()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    large_rows = n_rows if n_large_rows is None else n_large_rows
    train, held = _exact_datasets(
        Path(cache_dir),
        seed,
        (n_designs, n_rows),
        (n_large_burst, large_rows),
        n_heldout,
        state_cap,
        workers,
        log,
    )
    log(
        f"exact data ready: {len(train.cond_n)} conditionals, {len(train.values)} pairs "
        f"({time.time() - t0:.0f} s)"
    )
    net = ConditionalNet(
        n_kernels=n_kernels,
        width=width,
        depth=depth,
        activation=activation,
        moment_slope=moment_slope,
    )
    history = fit(
        net,
        train,
        epochs,
        lr=lr,
        pairs_per_batch=pairs_per_batch,
        seed=seed,
        log=log,
        time_limit=time_limit,
        hard_power=hard_power,
        hard_cap=hard_cap,
    )
    net.eval()
    metrics = summarize(score(_net_log_prob(net), held))
    log("held-out: " + json.dumps(metrics))
    meta = {
        "domain": {"box_log10": {k: list(v) for k, v in BOX.items()}, "state_cap": state_cap},
        "n_designs": n_designs,
        "n_large_burst": n_large_burst,
        "n_conditionals": len(train.cond_n),
        "n_pairs": len(train.values),
        "n_rows_per_design": n_rows,
        "n_rows_per_large_burst_design": large_rows,
        "pairs_per_batch": pairs_per_batch,
        "hard_power": hard_power,
        "hard_cap": hard_cap,
        "seed": seed,
        "heldout_seed": HELDOUT_SEED,
        "epochs_run": len(history),
        "epochs": epochs,
        "lr": lr,
        "final_train_kl": history[-1] if history else None,
        "wall_time_s": round(time.time() - t0, 1),
        "heldout": metrics,
        "torch_version": torch.__version__,
        "command": command,
    }
    path = save_approximator(net, Path(out_dir), meta)
    load_approximator(path)  # the written file must load and match its checksum
    return path


def __getattr__(name: str) -> Any:
    # The command line moved to pybivi.cme.training_cli, which imports this module: it is
    # looked up on use rather than imported here, and stays reachable as training.main.
    if name == "main":
        from pybivi.cme.training_cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    # ``python -m pybivi.cme.training`` still runs the command line.
    raise SystemExit(__getattr__("main")())

"""Kinetic calls on the demo simulation: precision, recall, null call rate, speed.

Fits ContrastiveBiVI once per simulation seed on the default demo simulation
(``pybivi demo``'s data: 3,000 cells x 800 genes, prepared as ``benchmarks/bench_demo.py``
does: doublets and unassigned cells dropped), caches the fitted model under
``.cache/kinetic_calls/`` (git-ignored) so that reruns only redo the tests, runs
:func:`pybivi.tl.de.kinetic` (and :func:`pybivi.tl.de.mean`, for the compensatory genes) on
every program against the controls and prints, per program and parameter:

* ``precision``: a false call is a call of ``b`` or ``gamma/k`` on a gene whose true
  change of that parameter is 0 (:func:`pybivi.datasets.truth_scores`);
* ``recall``: of the genes whose true ``|log2|`` change of that parameter, at the
  program's mean perturbation strength, is at least 1;
* ``null_call_rate``: the share of genes called on control-versus-control splits of
  the program's size;
* ``compensatory_kinetic_not_mean``: the share of the program's compensatory genes called
  by the kinetic test and not by the mean test;

then the time of ``de.kinetic`` for all programs and a summary per seed. With
``--delta-sweep`` the same fit is scored at other deltas; ``--method pairs`` runs the
paper's pooled-pairs test; ``--diagnostics`` prints the earlier diagnosis of the pooled
pairs (salient centres, spread within and between cells, the oracle, and with
``--group-level N`` / ``--likelihood-check N`` two experiments).

Usage (one torch thread; a fit takes a few minutes, later runs seconds)::

    .venv/bin/python benchmarks/kinetic_calls.py --seeds 0 1 2
        [--estimate decoded] [--delta 0.5] [--fdr 0.05] [--delta-sweep 0.3 0.5 1]
        [--method pairs] [--normalize median_ratio] [--epochs 60] [--refit]
        [--diagnostics [--group-level 40] [--likelihood-check 6]]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import docs_output  # noqa: E402
from kinetic_diagnostics import (  # noqa: E402  (a sibling script, not a package)
    composition_shift,
    group_level_calls,
    likelihood_check,
    salient_centres,
    spread_parts,
    spread_sources,
)

BINS = ((0.0, 1.0), (1.0, 1.5), (1.5, 2.0), (2.0, np.inf))


def prepared_data(cells: int, genes: int, seed: int):
    """The demo's simulation, prepared as ``pybivi demo`` does."""
    from pybivi import datasets, pp

    raw = datasets.simulate_perturbseq(n_cells=cells, n_genes=genes, seed=seed)
    return pp.prepare(
        raw, "perturbation", "NT", program_key="program", score_cell_cycle=False,
        n_top_genes=2000,
    )


def fit_or_load(adata, args: argparse.Namespace):
    """ContrastiveBiVI fitted on ``adata`` (from the cache when there is one)."""
    from pybivi.cme import load_default_approximator
    from pybivi.models import ContrastiveBiVI

    # The approximator's checksum in the name: a fit made with other weights is not reused.
    weights = load_default_approximator().metadata["sha256"][:8]
    tag = f"c{args.cells}_g{args.genes}_e{args.epochs}_s{args.seed}_{weights}"
    if args.kl_warmup is not None:
        tag += f"_w{args.kl_warmup:g}"
    if args.means_lr_factor != 1.0:
        tag += f"_m{args.means_lr_factor:g}"
    if args.lr != 1e-3:
        tag += f"_lr{args.lr:g}"
    if args.frequency_init != "random":  # fits cached before this option used "random"
        tag += f"_f{args.frequency_init}"
    # None leaves the model's own default (the paper's 10) and the cache tag unchanged.
    salient = {} if args.n_salient is None else {"n_salient": args.n_salient}
    if salient:
        tag += f"_t{args.n_salient}"
    path = ROOT / ".cache" / "kinetic_calls" / tag
    ContrastiveBiVI.setup_anndata(adata, perturbation_key="perturbation", control_labels=["NT"])
    if (path / "config.json").exists() and not args.refit:
        print(f"model: cached {path.relative_to(ROOT)}")
        return ContrastiveBiVI.load(path, adata)
    model = ContrastiveBiVI(adata, seed=args.seed, frequency_init=args.frequency_init, **salient)
    t0 = time.perf_counter()
    with _means_lr(model.module, args.means_lr_factor):
        model.train(
            max_epochs=args.epochs, seed=args.seed, progress_bar=False,
            kl_warmup_epochs=args.kl_warmup, lr=args.lr,
        )
    print(f"model: fitted {args.epochs} epochs in {time.perf_counter() - t0:.0f} s")
    model.save(path, overwrite=True)
    return model


@contextlib.contextmanager
def _means_lr(module, factor: float):
    """Experiment: Adam with ``factor`` x the learning rate on the salient prior means only.

    Adam moves a parameter by about ``lr`` per step, so with lr 1e-3 the per-label means
    ``mu_c`` of ``p(t | c)`` trail the encoder's centre of each label by 1.4 to 2.6 units
    after 60 epochs (1,300 steps); the KL then pulls every ``q(t | x)`` towards a lagging
    ``mu_c``. Training is :mod:`pybivi.training`'s; this only swaps the optimizer factory
    it calls for the duration of the fit.
    """
    from pybivi import training

    if factor == 1.0:
        yield
        return
    original = training.torch.optim.Adam
    means = module.salient_means

    def adam(params, lr, **kw):
        rest = [p for p in params if p is not means]
        return original([{"params": rest}, {"params": [means], "lr": lr * factor}], lr=lr, **kw)

    training.torch.optim.Adam = adam
    try:
        yield
    finally:
        training.torch.optim.Adam = original


def true_changes(adata, programs: list[str]) -> dict[str, np.ndarray]:
    """Per gene x program log2 changes at strength 1 and at the program's mean strength."""
    from pybivi.datasets import program_strengths

    strengths = program_strengths(adata)
    strength = np.array([strengths[p] for p in programs])
    out = {"burst_size": np.asarray(adata.varm["log2_b_change"]),
           "degradation_rate": np.asarray(adata.varm["log2_gamma_change"])}
    out.update({f"{k}_effective": v * strength[None, :] for k, v in list(out.items())})
    out["strength"] = strength
    return out


def rho_lfc(model, adata, programs: list[str], n_samples: int, seed: int) -> dict:
    """Pooled pairwise lfc median and sd of rho_N and rho_M per program vs controls."""
    from pybivi.posterior import pooled_samples
    from pybivi.tl.de import kinetic_bayes_factors

    labels = adata.obs["program"].astype(str).to_numpy()
    names = ("rho_nascent", "rho_mature")
    ref = pooled_samples(model, np.flatnonzero(labels == "control"), n_samples, names,
                         batch_size=256, seed=seed)
    out = {}
    for k, p in enumerate(programs):
        grp = pooled_samples(model, np.flatnonzero(labels == p), n_samples, names,
                             batch_size=256, seed=seed + k + 1)
        for n in names:
            res = kinetic_bayes_factors(grp[n], ref[n], seed=seed)
            out[(p, n)] = (res["lfc_median"], res["lfc_sd"])
    return out


def oracle_tables(adata, noise: float, seed: int) -> pd.DataFrame:
    """The kinetic test on draws from the simulator's per-cell truth (see de_vs_scvi)."""
    import arviz as az
    import xarray as xr

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from de_vs_scvi import _truth_draws

    from pybivi.tl import de

    draws = _truth_draws(adata, noise, 5, np.random.default_rng(seed))
    dims = ("chain", "draw", "cell", "gene")
    post = xr.Dataset({k: (dims, v) for k, v in draws.items()},
                      coords={"gene": list(adata.var_names)})
    const = xr.Dataset({"program": (("cell",), adata.obs["program"].astype(str).to_numpy())})
    programs = [str(p) for p in adata.uns["simulation"]["programs"]]
    idata = az.InferenceData(posterior=post, constant_data=const)
    return de.kinetic(idata, groupby="program", group=programs, method="pairs", seed=seed)


def recall_by_bin(table: pd.DataFrame, truth: dict, programs: list[str], key: str) -> dict:
    """Recall of the 'any' target per program and bin of the true |log2| (``key`` truth)."""
    out = {}
    for j, p in enumerate(programs):
        t = table[table["group"] == p]
        mag = np.maximum(np.abs(truth[f"burst_size{key}"][:, j]),
                         np.abs(truth[f"degradation_rate{key}"][:, j]))
        true = np.maximum(np.abs(truth["burst_size"][:, j]),
                          np.abs(truth["degradation_rate"][:, j])) >= 1
        called = (t["burst_size_is_de"] | t["degradation_rate_is_de"]).to_numpy(bool)
        for lo, hi in BINS:
            sel = true & (mag >= lo) & (mag < hi)
            out[(p, f"{lo:g}-{hi:g}")] = (int(sel.sum()), called[sel].mean() if sel.any() else
                                         np.nan)
    return out


def diagnostics(args: argparse.Namespace, adata, programs: list[str], model) -> None:
    """Where the pooled-pairs test (``method="pairs"``) loses the truth: the earlier
    diagnosis, printed with ``--diagnostics``."""
    from pybivi import datasets
    from pybivi.tl import de

    t0 = time.perf_counter()
    table = de.kinetic(model, groupby="program", group=programs, method="pairs",
                       n_samples=args.samples, seed=args.seed, normalize=args.normalize)
    print(f"kinetic test: {time.perf_counter() - t0:.0f} s; {adata.n_obs} cells x "
          f"{adata.n_vars} genes; delta 1, BF > 3, normalize {args.normalize}")
    truth = true_changes(adata, programs)
    scores = datasets.truth_scores(table, adata, strength="mean")
    unit = datasets.truth_scores(table, adata, strength="unit")
    rho = rho_lfc(model, adata, programs, args.samples, args.seed)
    # What the counts alone say: log2 ratio of mean normalised nascent counts.
    nascent = adata.layers["unspliced"].toarray()
    nascent = nascent / nascent.sum(1, keepdims=True)
    labels = adata.obs["program"].astype(str).to_numpy()
    control = nascent[labels == "control"].mean(0)
    rows = []
    for j, p in enumerate(programs):
        t = table[table["group"] == p]
        any_ = scores[(scores["program"] == p) & (scores["target"] == "any")].iloc[0]
        row = {"program": p, "kind": adata.uns["simulation"]["program_kinds"][j],
               "strength": truth["strength"][j], "n_true": any_["n_true"],
               "precision": any_["precision"], "recall": any_["recall"],
               "recall_strong": any_["recall_strong"],
               "recall_unit": unit[(unit["program"] == p) & (unit["target"] == "any")]
               ["recall"].iloc[0]}
        moved = np.abs(truth["burst_size_effective"][:, j]) >= 1
        if moved.any():
            counts_lfc = np.log2(nascent[labels == p].mean(0) / control)
            row["counts_N/true"] = np.median(counts_lfc[moved]
                                             / truth["burst_size_effective"][moved, j])
        for q, short in (("burst_size", "b"), ("degradation_rate", "g")):
            true = truth[f"{q}_effective"][:, j]
            sel = np.abs(truth[q][:, j]) >= 1
            if sel.any():
                est = t[f"{q}_lfc_median"].to_numpy()[sel]
                row[f"{short}_est/true"] = np.median(est / true[sel])
                row[f"{short}_sd"] = np.median(t[f"{q}_lfc_sd"].to_numpy()[sel])
        changed = (np.abs(truth["burst_size"][:, j]) + np.abs(truth["degradation_rate"][:, j])) > 0
        sign = np.sign(truth["burst_size"][:, j] + truth["degradation_rate"][:, j])[changed]
        for n, short in (("rho_nascent", "rhoN"), ("rho_mature", "rhoM")):
            med, sd = rho[(p, n)]
            row[f"{short}_signed"] = np.median(med[changed] * sign)
            row[f"{short}_sd"] = np.median(sd[changed])
        rows.append(row)
    pd.set_option("display.width", 200)
    print("\nper program (true genes: |log2| >= 1 at the program's mean strength; recall_unit: "
          "at strength 1; est/true: median over genes with |log2| >= 1 at strength 1 of the "
          "estimated over the true change at the mean strength; sd: spread of the pooled "
          "pairwise lfc; recall_strong: genes with |log2| >= 1.5; counts_N/true: mean "
          "normalised nascent counts, group over controls, for genes whose b moves):")
    print(pd.DataFrame(rows).round(2).to_string(index=False))
    print("\nsalient space (nearest_own_centre: share of the program's cells; rhoN_at_centre: "
          "decoded nascent change at the centre over the truth):")
    print(salient_centres(model, adata, programs, truth).round(2).to_string(index=False))
    print("\nsd of log2 b over the program's genes, within a cell (draws) and between cells "
          "(posterior means); the truth is one value per group:")
    print(spread_parts(model, adata, programs, truth, args.seed).round(3).to_string(index=False))
    print("\nbetween-cell sd of decoded log2 rho_N of the program's b genes in its cells: at "
          "the posterior means, with t at its perturbation's mean, with z at the group mean:")
    print(spread_sources(model, adata, programs).round(3).to_string(index=False))
    print("\ncontrols: mean log2 b by phase over genes nothing changes (truth: 0 shift):")
    print(composition_shift(model, adata, args.seed).round(3).to_string(index=False))
    model_bins = recall_by_bin(table, truth, programs, "_effective")
    spread = float(np.nanmedian([r.get(k, np.nan) for r in rows for k in ("b_sd", "g_sd")]))
    # Per-draw noise whose pairwise spread matches the model's: sd_pair = sqrt(2) * noise.
    noise = round(spread / np.sqrt(2), 2)
    oracle = {s: oracle_tables(adata, s, args.seed) for s in (0.0, noise)}
    oracles = {s: recall_by_bin(t, truth, programs, "_effective") for s, t in oracle.items()}
    print(f"\nrecall by true |log2| at the program's mean strength (n genes; model, oracle "
          f"without noise, oracle with noise sd {noise} per draw):")
    out = []
    for key, (n, r) in model_bins.items():
        out.append({"program": key[0], "bin": key[1], "n": n, "model": r,
                    "oracle": oracles[0.0][key][1], f"oracle_{noise}": oracles[noise][key][1]})
    print(pd.DataFrame(out).pivot(index="program", columns="bin").round(2).to_string())
    ceiling = datasets.truth_scores(oracle[noise], adata, strength="mean")
    ceiling = ceiling[ceiling["target"] == "any"].set_index("program")["recall"]
    print(f"\nrecall ('any', mean strength) of unbiased draws with the model's spread (oracle, "
          f"noise sd {noise}) vs the model's:")
    print(pd.DataFrame({"oracle": ceiling, "model": scores[scores["target"] == "any"]
                        .set_index("program")["recall"]}).round(2).T.to_string())
    if args.group_level:
        grouped, expression = group_level_calls(model, adata, programs, table,
                                                args.group_level, args.seed)
        g_scores = datasets.truth_scores(grouped, adata, strength="mean")
        g_scores = g_scores[g_scores["target"] == "any"].set_index("program")
        print(f"\ngroup-level test ({args.group_level} draws per cell, mean log2 over the "
              "group's cells, BF > 3 at delta 1) against the pooled pairs:")
        print(pd.DataFrame({
            "precision_group": g_scores["precision"], "recall_group": g_scores["recall"],
            "precision_pairs": scores[scores["target"] == "any"].set_index("program")
            ["precision"],
            "recall_pairs": scores[scores["target"] == "any"].set_index("program")["recall"],
        }).round(2).T.to_string())
        print("\nmean counts per cell (median over genes) of the group-level test's false calls "
              "and of the unchanged genes it leaves alone:")
        print(expression.round(3).to_string(index=False))
    if args.likelihood_check:
        check = likelihood_check(adata, programs, args.likelihood_check, args.seed)
        print("\nlikelihood profile of the compensatory change (e = 1 is the truth):")
        print(check.round(2).to_string(index=False))
        print("median argmax e: " + ", ".join(
            f"{k[len('argmax_e_'):]} {check[k].median():.2f}" for k in check if
            k.startswith("argmax")))


def score_calls(kinetic_table: pd.DataFrame, mean_table: pd.DataFrame, adata,
                programs: list[str]) -> pd.DataFrame:
    """Per program and parameter: precision (a false call is a call of a gene whose true
    change of that parameter is 0), recall (genes whose true |log2| change at the
    program's mean strength is >= 1), the null call rate, and per program the share of
    compensatory genes called by the kinetic test and missed by the mean test."""
    from pybivi import datasets

    scores = datasets.truth_scores(kinetic_table, adata, strength="mean")
    comp = datasets.compensatory_summary(kinetic_table, mean_table, adata).set_index("program")
    kinds = dict(zip(programs, adata.uns["simulation"]["program_kinds"], strict=True))
    rows = []
    for _, r in scores[scores["target"] != "any"].iterrows():
        t = kinetic_table[kinetic_table["group"] == r["program"]]
        null_col = f"{r['target']}_null_call_rate"
        rows.append({
            "program": r["program"], "kind": kinds[r["program"]], "param": r["target"],
            "n_true": r["n_true"], "n_called": r["n_called"], "precision": r["precision"],
            "recall": r["recall"],
            "null_call_rate": t[null_col].iloc[0] if null_col in t else np.nan,
            "compensatory_kinetic_not_mean":
                comp.loc[r["program"], "fraction_kinetic_not_mean"],
        })
    return pd.DataFrame(rows)


def run_seed(args: argparse.Namespace, seed: int) -> tuple[pd.DataFrame, dict]:
    """Fit (or load) the demo model of one simulation seed and score the calls."""
    from pybivi.tl import de

    args.seed = seed
    adata = prepared_data(args.cells, args.genes, seed)
    programs = [str(p) for p in adata.uns["simulation"]["programs"]]
    model = fit_or_load(adata, args)
    kw = dict(groupby="program", group=programs, seed=seed, method=args.method,
              normalize=args.normalize)
    if args.method == "group":
        kw.update(estimate=args.estimate, delta=args.delta, fdr_target=args.fdr,
                  shrink=args.shrink)
    else:
        kw.update(n_samples=args.samples)
    t0 = time.perf_counter()
    table = de.kinetic(model, **kw)
    seconds = time.perf_counter() - t0
    mean_kw = {k: v for k, v in kw.items() if k not in ("normalize", "estimate", "shrink")}
    if args.method == "pairs":
        mean_kw.pop("delta", None)
    mean_table = de.mean(model, **mean_kw)
    extra = {"seconds": seconds, "n_cells": adata.n_obs, "n_genes": adata.n_vars,
             "adata": adata, "programs": programs, "model": model, "table": table}
    return score_calls(table, mean_table, adata, programs), extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--genes", type=int, default=800)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="simulation (and fit) seeds; 0 is the demo's")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--kl-warmup", type=float, default=None, help="epochs (default 1/4)")
    parser.add_argument("--method", choices=("group", "pairs"), default="group",
                        help="pybivi.tl.de.kinetic's method (default: group)")
    parser.add_argument("--estimate", choices=("observed", "decoded"), default="observed")
    parser.add_argument("--delta", type=float, default=None,
                        help="default: the method's own (0.5 group, 1 pairs)")
    parser.add_argument("--fdr", type=float, default=0.05, help="fdr_target (group)")
    parser.add_argument("--delta-sweep", type=float, nargs="*", default=None,
                        help="also score these deltas (group method, same fit)")
    parser.add_argument("--samples", type=int, default=5000, help="n_samples (pairs)")
    parser.add_argument("--means-lr-factor", type=float, default=1.0,
                        help="experiment: learning-rate factor of the salient prior means")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--n-salient", type=int, default=None,
                        help="salient dimensions (default: the model's, 10 as in the paper)")
    parser.add_argument("--normalize", choices=("median_ratio",), default=None)
    parser.add_argument("--shrink", choices=("joint", "separate"), default="joint",
                        help="group test: one prior over both parameters of a gene "
                        "(default) or one per parameter")
    parser.add_argument("--refit", action="store_true")
    parser.add_argument("--frequency-init", default="auto", choices=("auto", "data", "random"),
                        help="how the decoder starts (see the model classes)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also print the pooled-pairs diagnosis (first seed)")
    parser.add_argument("--group-level", type=int, default=0, metavar="N",
                        help="with --diagnostics: test group means of N draws per cell")
    parser.add_argument("--likelihood-check", type=int, default=0, metavar="N",
                        help="with --diagnostics: profile the likelihood on N genes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pd.set_option("display.width", 200)
    all_scores = []
    for seed in args.seeds:
        scores, extra = run_seed(args, seed)
        scores.insert(0, "seed", seed)
        all_scores.append(scores)
        print(f"\nseed {seed}: de.kinetic ({args.method}, estimate {args.estimate}, delta "
              f"{args.delta if args.delta is not None else 'default'}, fdr {args.fdr}"
              f"{', shrink ' + args.shrink if args.method == 'group' else ''}) on "
              f"{extra['n_cells']} cells x {extra['n_genes']} genes, "
              f"{len(extra['programs'])} programs: {extra['seconds']:.1f} s")
        print(scores.drop(columns="seed").round(3).to_string(index=False))
        from pybivi import datasets

        any_ = datasets.truth_scores(extra["table"], extra["adata"], strength="mean")
        any_ = any_[any_["target"] == "any"].set_index("program")
        print("either parameter ('any'; precision_strict counts every call outside the >= 2x "
              "genes as false, the definition of earlier versions):")
        print(any_[["precision_strict", "recall"]].round(2).T.to_string())
        if args.delta_sweep and args.method == "group":
            print(f"\nseed {seed}: delta sweep (min over programs and parameters):")
            print(delta_sweep(args, extra).round(3).to_string(index=False))
        if args.diagnostics and seed == args.seeds[0]:
            diagnostics(args, extra["adata"], extra["programs"], extra["model"])
    table = pd.concat(all_scores)
    summary = table.groupby("seed").agg(
        min_precision=("precision", "min"), min_recall=("recall", "min"),
        max_null_call_rate=("null_call_rate", "max"),
        min_compensatory_kinetic_not_mean=("compensatory_kinetic_not_mean", "min"))
    print("\nsummary per seed (over programs and parameters; nan: no true genes):")
    print(summary.round(3).to_string())
    return 0


def delta_sweep(args: argparse.Namespace, extra: dict) -> pd.DataFrame:
    """Precision and recall of the group test at other deltas (one fit)."""
    from pybivi.tl import de

    rows = []
    for delta in args.delta_sweep:
        kw = dict(groupby="program", group=extra["programs"], seed=args.seed,
                  estimate=args.estimate, delta=delta, fdr_target=args.fdr,
                  normalize=args.normalize, shrink=args.shrink)
        table = de.kinetic(extra["model"], **kw)
        mean_table = de.mean(extra["model"], groupby="program", group=extra["programs"],
                             seed=args.seed, delta=delta, fdr_target=args.fdr)
        s = score_calls(table, mean_table, extra["adata"], extra["programs"])
        rows.append({"delta": delta, "min_precision": s["precision"].min(),
                     "min_recall": s["recall"].min(),
                     "max_null_call_rate": s["null_call_rate"].max(),
                     "min_compensatory": s["compensatory_kinetic_not_mean"].min()})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    sys.exit(docs_output.run(main))

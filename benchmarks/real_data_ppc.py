"""Where BiVI's misfit on real cells comes from: held-out ELBO, PPC, and two hypotheses.

Data: ``../shared/data/pancreas_739.h5ad`` (739 mouse pancreas cells, raw spliced and
unspliced counts), prepared with ``pp.prepare(perturbation_key=None)`` and the
``--genes`` most variable genes. Each reaction scheme is fitted as ``BiVI`` on the same
fixed split (20% of the cells held out, ``split_seed=0``), then:

* held-out negative ELBO per cell, 10 particles, three estimates (their spread is the
  estimator's noise);
* ``model.diagnostics()``: the share of (n, m) pairs outside the approximator's domain;
* a posterior-predictive check on every cell with ``--replicates`` replicates: per
  statistic, the share of genes inside the central 95% against what a calibrated model
  reaches with that many replicates, the tails, and the median replicate / observed ratio.

Hypotheses about the bursty fit:

A. *The approximator is wrong where the fit sits* (mostly the small-burst region
   ``b < 1e-3``, where a Poisson limit replaces the network). For held-out pairs drawn
   from each region, ``log P(m | n)`` from the approximator is compared with the exact
   solver (``pybivi.cme.exact``) at the fitted parameters, and the per-cell ELBO bias it
   implies (mean difference x share of pairs in the region x genes) is reported.
B. *The genes that collapse to the small-burst limit carry the misfit*: per gene, the
   replicate / observed ratio of the nascent and mature variances and of the correlation,
   grouped by the gene's share of pairs in the small-burst region.
C. *The misfit sits in the weakly expressed genes*: the same ratios by tercile of the
   observed mean mature count, for every scheme.
D. *The replicates' excess spread comes from the latents' posterior uncertainty, not from
   the scheme's noise*: ``--plugin`` repeats the check with every cell's latents fixed at
   their posterior mean.
E. *Too few optimiser steps*: ``--batch-size 32`` trains the same epochs with four times
   the steps.
F. *The decoder starts far from the genes' frequencies*: ``--frequency-init data`` starts
   each gene at its share of the counts (``frequency_init="data"`` of the model classes).

Run (about 5 minutes on one core with the defaults; fits are cached under ``--out``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/real_data_ppc.py \\
        [--genes 500] [--epochs 100] [--batch-size 128] [--replicates 100] [--seed 0] \\
        [--schemes bursty,extrinsic,constitutive] [--pairs 300] [--out results/real_data_ppc]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import docs_output
import numpy as np
import pandas as pd
import torch

import pybivi
from pybivi import datasets, pp
from pybivi.cme.regions import DOMAIN_REGIONS, domain_regions
from pybivi.schemes import ExactConditional
from pybivi.tl import ppc

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pancreas_739.h5ad"


def load_data(n_genes: int):
    raw = datasets.read(DATA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = pp.prepare(raw, perturbation_key=None, score_cell_cycle=False, n_top_genes=n_genes)
    pybivi.BiVI.setup_anndata(adata, perturbation_key=None)
    return adata


def fit(adata, scheme: str, args) -> tuple[pybivi.BiVI, float]:
    """Train (or load from the cache) one BiVI on the fixed split."""
    path = Path(args.out) / "fits" / f"{scheme}_{_tag(args)}"
    if (path / "config.json").exists():
        return pybivi.BiVI.load(path, adata), float("nan")
    model = pybivi.BiVI(adata, scheme=scheme, seed=args.seed, frequency_init=args.frequency_init)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train(max_epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                    progress_bar=False, validation_fraction=0.2, split_seed=0,
                    kl_warmup_epochs=25)
    for w in caught:
        if "once per model" in str(w.message):
            print(f"  [{scheme}] warning: {w.message}")
    seconds = time.perf_counter() - start
    model.save(path, overwrite=True)
    return model, seconds


def _tag(args) -> str:
    tag = f"g{args.genes}_e{args.epochs}_s{args.seed}"
    tag = tag if args.batch_size == 128 else f"{tag}_b{args.batch_size}"
    return tag if args.frequency_init == "random" else f"{tag}_f{args.frequency_init}"


def evaluate(model, args) -> dict:
    """Held-out ELBO, domain shares and the PPC summary of one fitted model."""
    elbos = [model.elbo(indices=model.validation_indices, n_particles=10, seed=k)
             for k in range(3)]
    table = model.diagnostics()
    check = ppc.ppc(model, n_replicates=args.replicates, seed=0)
    keep = ["median_ratio", "fraction_low_tail", "fraction_high_tail", "fraction_central_95",
            "expected_central_95"]
    return {
        "heldout_neg_elbo": float(np.mean(elbos)),
        "heldout_neg_elbo_spread": float(np.ptp(elbos)),
        "outside_domain": {} if table.empty else table["share"].to_dict(),
        "ppc": check.summary[keep].to_dict(orient="index"),
        "_check": check,
    }


@torch.no_grad()
def fitted_pairs(model, indices) -> dict[str, np.ndarray]:
    """Counts and kinetic parameters at the posterior mean, flattened over cells x genes."""
    module = model.module
    module.eval()
    out: dict[str, list] = {k: [] for k in ("n", "m", "b", "beta", "gamma")}
    for batch in model.make_batches(indices=indices, batch_size=256):
        z = module.encode(batch)["z"][0]
        dec = module.decode(z, None, batch["library_nascent"], batch["library_mature"])
        kin = module.scheme.kinetic_params(dec["mu_nascent"], dec["mu_mature"], module.theta)
        out["n"].append(batch["x_nascent"])
        out["m"].append(batch["x_mature"])
        for key, name in (("b", "burst_size"), ("beta", "splicing_rate"),
                          ("gamma", "degradation_rate")):
            out[key].append(kin[name])
    return {k: torch.cat(v).double().reshape(-1).numpy() for k, v in out.items()}


def hypothesis_a(model, n_pairs: int, seed: int) -> pd.DataFrame:
    """Approximator versus exact ``log P(m | n)`` on held-out pairs, per region."""
    pairs = fitted_pairs(model, model.validation_indices)
    t = {k: torch.as_tensor(v) for k, v in pairs.items()}
    masks = domain_regions(t["n"], t["b"], t["beta"], t["gamma"])
    approx = model.module.scheme.backend
    exact = ExactConditional(max_grid=20_000_000)
    rng = np.random.default_rng(seed)
    n_genes = model.registry.n_genes
    rows = []
    for region in (*DOMAIN_REGIONS, "inside"):
        where = np.flatnonzero(masks[region].numpy())
        share = len(where) / len(pairs["n"])
        if not len(where):
            continue
        pick = torch.as_tensor(rng.choice(where, size=min(n_pairs, len(where)), replace=False))
        args = [t[k][pick] for k in ("n", "m", "b", "beta", "gamma")]
        with approx.quiet():
            neural = approx.log_prob_mature_given_nascent(*(a.float() for a in args)).double()
        truth = torch.full_like(neural, float("nan"))
        for i in range(len(pick)):  # pair by pair: a few need grids too large to solve
            try:
                truth[i] = exact.log_prob_mature_given_nascent(*(a[i : i + 1] for a in args))[0]
            except ValueError:
                pass
        diff = (neural - truth).numpy()
        skipped = int(np.sum(~np.isfinite(diff)))
        diff = diff[np.isfinite(diff)]
        if not len(diff):
            continue
        rows.append({
            "region": region, "share_of_pairs": share, "pairs_compared": len(diff),
            "pairs_skipped": skipped,
            "mean_diff_nats": float(diff.mean()), "mean_abs_diff_nats": float(np.abs(diff).mean()),
            "p99_abs_diff_nats": float(np.quantile(np.abs(diff), 0.99)),
            "elbo_bias_per_cell_nats": float(diff.mean() * share * n_genes),
        })
    return pd.DataFrame(rows).set_index("region")


def hypothesis_b(model, check) -> pd.DataFrame:
    """Per-gene replicate / observed ratios grouped by the gene's small-burst share."""
    share = model.diagnostics(by="gene")["small_burst"]
    groups = {"none": share == 0, "under half": (share > 0) & (share < 0.5),
              "half or more": share >= 0.5}
    return _ratios_by_group(check.table, groups)


def by_expression(check) -> pd.DataFrame:
    """The same ratios by tercile of the observed mean mature count (low, mid, high)."""
    mean = check.observed["mean_mature"]
    edges = mean.quantile([1 / 3, 2 / 3]).to_numpy()
    groups = {"low": mean <= edges[0], "mid": (mean > edges[0]) & (mean <= edges[1]),
              "high": mean > edges[1]}
    return _ratios_by_group(check.table, groups)


def _ratios_by_group(table: pd.DataFrame, groups: dict) -> pd.DataFrame:
    rows = []
    for name, mask in groups.items():
        row = {"group": name, "genes": int(mask.sum())}
        for stat in ("variance_nascent", "variance_mature", "correlation"):
            t = table[table["statistic"] == stat]
            t = t[mask.reindex(t.index).to_numpy()]
            ok = t["observed"] > 0
            ratio = (t["replicate_mean"][ok] / t["observed"][ok]).median() if ok.any() else np.nan
            inside = ((t["ppp"] - 0.5).abs() <= 0.475).mean() if len(t) else np.nan
            row[f"{stat}_ratio"] = float(ratio)
            row[f"{stat}_central_95"] = float(inside)
        rows.append(row)
    return pd.DataFrame(rows).set_index("group")


@torch.no_grad()
def plugin_check(model, n_replicates: int, seed: int):
    """PPC with every cell's latents fixed at their posterior mean (no draw from the guide).

    Against the ordinary check it separates the two sources of the replicates' spread: the
    reaction scheme's noise given the latents, and the latents' posterior uncertainty.
    """
    module = model.module
    module.eval()
    n_genes = model.registry.n_genes
    observed = ppc.CountMoments(n_genes)
    replicated = ppc.CountMoments(n_genes, leading=(n_replicates,))
    gen = torch.Generator().manual_seed(seed)
    cells = max(1, 4_000_000 // (n_replicates * n_genes * 2))
    for batch in model.make_batches(batch_size=cells):
        z = module.encode(batch)["z"][0]
        dec = module.decode(z, None, batch["library_nascent"], batch["library_mature"])
        x = module.scheme.sample(dec["mu_nascent"], dec["mu_mature"], module.theta,
                                 sample_shape=(n_replicates,), generator=gen).numpy()
        observed.add(batch["x_nascent"].numpy(), batch["x_mature"].numpy())
        replicated.add(x[..., 0], x[..., 1])
    genes = [str(g) for g in model.registry.var_names]
    return ppc.summarise(observed.finalize(), replicated.finalize(), genes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--replicates", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128,
                        help="smaller batches: more optimiser steps per epoch")
    parser.add_argument("--schemes", default="bursty,extrinsic,constitutive")
    parser.add_argument("--pairs", type=int, default=300,
                        help="pairs per region for A (0: skip hypotheses A and B)")
    parser.add_argument("--frequency-init", default="random", choices=["random", "data", "auto"],
                        help="how the decoder's gene frequencies start (see the model classes)")
    parser.add_argument("--out", default=str(ROOT / "results" / "real_data_ppc"))
    parser.add_argument("--plugin", action="store_true",
                        help="only hypothesis D: PPC with latents at their posterior mean")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not DATA.exists():
        raise SystemExit(f"{DATA} not found")
    adata = load_data(args.genes)
    print(f"{adata.n_obs} cells x {adata.n_vars} genes, {args.epochs} epochs of batches of "
          f"{args.batch_size}, "
          f"{args.replicates} replicates, seed {args.seed}")
    results, checks, models = {}, {}, {}
    if args.plugin:
        for scheme in args.schemes.split(","):
            model, _ = fit(adata, scheme, args)
            summary = plugin_check(model, args.replicates, args.seed).summary
            keep = ["median_ratio", "fraction_central_95", "expected_central_95"]
            print(f"\n== D: {scheme}, latents at their posterior mean")
            print(summary[keep].round(3).to_string())
            results[scheme] = summary[keep].to_dict(orient="index")
        out = Path(args.out) / f"plugin_{_tag(args)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=float))
        print(f"\nwrote {out}")
        return
    for scheme in args.schemes.split(","):
        model, seconds = fit(adata, scheme, args)
        res = evaluate(model, args)
        checks[scheme], models[scheme] = res.pop("_check"), model
        res["train_seconds"] = seconds
        results[scheme] = res
        print(f"\n== {scheme}: held-out -ELBO/cell {res['heldout_neg_elbo']:.2f} "
              f"(spread of 3 estimates {res['heldout_neg_elbo_spread']:.2f}); "
              f"train {seconds:.0f} s")
        if res["outside_domain"]:
            print("outside domain:", {k: f"{100 * v:.3g}%" for k, v in
                                      res["outside_domain"].items()})
        print(pd.DataFrame(res["ppc"]).T.round(3).to_string())
    if "bursty" in models and args.pairs > 0:
        a = hypothesis_a(models["bursty"], args.pairs, args.seed)
        b = hypothesis_b(models["bursty"], checks["bursty"])
        for scheme, check in checks.items():
            print(f"\n== {scheme}: per-gene ratios by expression tercile (mean mature count)")
            tercile = by_expression(check)
            print(tercile.round(3).to_string())
            results[scheme]["by_expression"] = tercile.to_dict(orient="index")
        print("\n== A: approximator - exact log P(m | n) on held-out pairs, by region")
        print(a.round(4).to_string())
        print("\n== B: per-gene replicate / observed ratios by small-burst share")
        print(b.round(3).to_string())
        results["hypothesis_a"] = a.to_dict(orient="index")
        results["hypothesis_b"] = b.to_dict(orient="index")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = out / f"summary_{_tag(args)}.json"
    name.write_text(json.dumps(results, indent=1, default=float))
    print(f"\nwrote {name}")


if __name__ == "__main__":
    docs_output.run(main)

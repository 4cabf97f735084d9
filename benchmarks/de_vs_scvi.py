"""pybivi.tl.de.mean against scvi-tools' own ``change``-mode computation, on the same draws.

A pybivi SCVI (ZINB, mature counts) is fitted on a simulated screen; for each program
versus the controls, posterior draws of normalised mature expression are taken once
(exactly the draws :func:`pybivi.tl.de.mean` uses: reference seed ``seed``, group ``k``
seed ``seed + k + 1``) and handed both to pybivi's Bayes-factor code and to
scvi-tools' ``DifferentialComputation.get_bayes_factors(mode="change")`` (the code
behind ``model.differential_expression(mode="change")``), through a ``model_fn`` that
returns those draws. Printed per program: the largest differences in P(DE), the log
Bayes factor and the lfc mean, the pseudo-count each side chose, and how many calls
(odds > 2, i.e. log-odds > ln 2) agree.

Needs scvi-tools importable (it is not a pybivi dependency), e.g.::

    PYTHONPATH=/path/to/scvi-tools-site .venv/bin/python benchmarks/de_vs_scvi.py

``--truth`` instead fits ContrastiveBiVI (bursty), SCVI and ContrastiveVI on the default
demo simulation and prints the figure-3 section of :func:`pybivi.report.figure3`: precision
and recall of the kinetic calls against the simulator's truth per program, and how many
compensatory genes the kinetic test calls while the mean tests miss them (no scvi-tools
needed)::

    .venv/bin/python benchmarks/de_vs_scvi.py --truth --epochs 100

``--oracle`` runs :func:`pybivi.tl.de.kinetic` on "posterior" draws made from the simulator's
own per-cell truth (log2 b and gamma/k of every cell, capture removed, plus Gaussian noise
of sd ``--noise`` in log2 as a stand-in for posterior spread): the precision and recall that
biVI's test itself allows on this simulation, whatever the model::

    .venv/bin/python benchmarks/de_vs_scvi.py --oracle --noise 0 0.3 0.6

``--bivi-weights ../shared/reference/bivi-approximator-weights.zip`` runs the bursty
likelihood on biVI's network instead of pybivi's approximator, for comparison.
"""

from __future__ import annotations

import argparse
import sys
import time

import docs_output
import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truth", action="store_true", help="kinetic calls against truth")
    parser.add_argument("--cells", type=int, default=None, help="2000 (3000 with --truth)")
    parser.add_argument("--genes", type=int, default=None, help="300 (800 with --truth)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bivi-weights", default=None, help="bursty backend: biVI's network")
    parser.add_argument("--oracle", action="store_true", help="kinetic test on true draws")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    args = parser.parse_args(argv)
    if args.oracle:
        args.cells, args.genes = args.cells or 3000, args.genes or 800
        return oracle(args)
    if args.truth:
        args.cells, args.genes = args.cells or 3000, args.genes or 800
        return ground_truth(args)
    args.cells, args.genes = args.cells or 2000, args.genes or 300
    try:
        from scvi import REGISTRY_KEYS  # noqa: F401
        from scvi.model import SCVI as ScviToolsSCVI
        from scvi.model.base._differential import DifferentialComputation
    except ImportError as err:
        print(f"scvi-tools is not importable ({err}); nothing to compare against.")
        return 0
    import scvi

    from pybivi import datasets
    from pybivi.models import SCVI
    from pybivi.posterior import pooled_samples
    from pybivi.tl import de

    torch.set_num_threads(2)
    adata = datasets.simulate_perturbseq(n_cells=args.cells, n_genes=args.genes, seed=args.seed)
    SCVI.setup_anndata(adata, perturbation_key="perturbation", control_labels="NT")
    model = SCVI(adata, seed=args.seed)
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, progress_bar=False, seed=args.seed)
    print(
        f"pybivi SCVI: {args.cells} cells x {args.genes} genes, {args.epochs} epochs in "
        f"{time.perf_counter() - t0:.1f} s; scvi-tools {scvi.__version__}"
    )

    programs = [str(p) for p in adata.uns["simulation"]["programs"]]
    labels = adata.obs["program"].astype(str).to_numpy()
    ref_idx = np.flatnonzero(labels == "control")

    def draws(idx: np.ndarray, seed: int) -> np.ndarray:
        # Same batch size and seeds as pybivi.tl.de.mean, hence the very same draws.
        out = pooled_samples(model, idx, args.samples, ["rho_mature"], batch_size=256, seed=seed)
        return out["rho_mature"]

    # scvi-tools side: its AnnDataManager only serves the counts for the pseudo-count.
    scvi_adata = adata.copy()
    ScviToolsSCVI.setup_anndata(scvi_adata, layer="spliced")
    manager = ScviToolsSCVI._get_most_recent_anndata_manager(scvi_adata)
    ref_draws = draws(ref_idx, args.seed)
    cache: dict[bytes, np.ndarray] = {ref_idx.tobytes(): ref_draws}

    def model_fn(adata, indices, transform_batch=None, n_samples_overall=None):
        return cache[np.asarray(indices, dtype=np.int64).tobytes()]

    dc = DifferentialComputation(model_fn, None, manager)
    t_scvi = 0.0
    print(
        f"{'program':>9} {'max|dP|':>8} {'max|dlogBF|':>11} {'max|dlfc|':>9} "
        f"{'eps ours':>9} {'eps scvi':>9} {'calls ours/scvi/agree':>22}"
    )
    worst = 0.0
    t0 = time.perf_counter()
    table = de.mean(
        model,
        groupby="program",
        group=programs,
        reference="control",
        method="pairs",  # scvi-tools' change mode pools random pairs of cells
        n_samples=args.samples,
        seed=args.seed,
    )
    t_ours = time.perf_counter() - t0
    for k, g in enumerate(programs):
        idx = np.flatnonzero(labels == g)
        cache[idx.tobytes()] = draws(idx, args.seed + k + 1)
        ours = table[table["group"] == g]
        t0 = time.perf_counter()
        theirs = dc.get_bayes_factors(
            labels == g,
            labels == "control",
            mode="change",
            delta=0.2,
            use_observed_batches=True,
            n_samples_overall=args.samples,
        )
        t_scvi += time.perf_counter() - t0
        dp = np.abs(ours["proba_de"].to_numpy() - theirs["proba_de"]).max()
        # scvi-tools 1.4's bayes_factor is the (unsigned) natural log of the odds.
        dbf = np.abs(ours["log_bayes_factor"].to_numpy() - theirs["bayes_factor"]).max()
        dlfc = np.abs(ours["lfc_mean"].to_numpy() - theirs["lfc_mean"]).max()
        call_ours = ours["is_de"].to_numpy()
        call_scvi = theirs["bayes_factor"] > np.log(2.0)
        agree = int(np.sum(call_ours == call_scvi))
        worst = max(worst, dp)
        print(
            f"{g:>9} {dp:8.2e} {dbf:11.2e} {dlfc:9.2e} {ours['pseudocounts'].iloc[0]:9.2e} "
            f"{float(theirs['pseudocounts']):9.2e} "
            f"{int(call_ours.sum()):>8}/{int(call_scvi.sum())}/{agree}of{len(call_ours)}"
        )
    print(
        f"time: pybivi.tl.de.mean {t_ours:.2f} s (draws included), scvi-tools get_bayes_factors "
        f"{t_scvi:.2f} s (draws cached) over {len(programs)} programs"
    )
    print(f"largest |P(DE) difference| over programs: {worst:.2e}")
    return 0


def ground_truth(args: argparse.Namespace) -> int:
    """Fit the three models on the simulation and print figure 3 against the truth."""
    from pybivi import datasets, report
    from pybivi.models import SCVI, ContrastiveBiVI, ContrastiveVI

    torch.set_num_threads(2)
    adata = datasets.simulate_perturbseq(n_cells=args.cells, n_genes=args.genes, seed=args.seed)
    scheme = "bursty"
    if args.bivi_weights:
        from pybivi.cme.bivi import load_bivi_approximator
        from pybivi.schemes import BurstyScheme

        scheme = BurstyScheme(backend=load_bivi_approximator(args.bivi_weights))
        print(f"bursty backend: biVI's network from {args.bivi_weights}")
    models = {}
    for cls in (ContrastiveBiVI, SCVI, ContrastiveVI):
        a = adata.copy()
        cls.setup_anndata(a, perturbation_key="perturbation", control_labels="NT")
        kw = {"scheme": scheme} if cls is ContrastiveBiVI else {}
        models[cls.__name__] = model = cls(a, seed=args.seed, **kw)
        t0 = time.perf_counter()
        model.train(max_epochs=args.epochs, progress_bar=False, seed=args.seed)
        # A negative loss (-ELBO per cell) would mean log-probabilities above 0: invalid.
        loss = float(model.history["train_loss"].iloc[-1])
        print(
            f"{cls.__name__}: {args.epochs} epochs in {time.perf_counter() - t0:.1f} s, "
            f"final training loss {loss:.1f} per cell"
        )
    t0 = time.perf_counter()
    out = report.figure3(
        models["ContrastiveBiVI"],
        models["SCVI"],
        models["ContrastiveVI"],
        truth=adata,
        n_samples=args.samples,
        seed=args.seed,
    )
    print(
        f"figure 3 section in {time.perf_counter() - t0:.1f} s "
        f"({args.cells} cells x {args.genes} genes)\n"
    )
    print(out["text"], "\n")
    print(out["truth"].to_string(index=False), "\n")
    print(out["compensatory"].to_string(index=False))
    return 0


def _truth_draws(adata, noise: float, n_draws: int, rng: np.random.Generator):
    """(chain, draw, cell, gene) draws of b (capture removed) and gamma/k around the truth."""
    sim = adata.uns["simulation"]
    table = sim["perturbations"]
    lookup = {
        p: (int(str(g)[len("program") :]) - 1, s)
        for p, g, s in zip(table["perturbation"], table["program"], table["strength"], strict=True)
    }
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    prog = np.array([lookup.get(lab, (-1, 0.0))[0] for lab in labels])
    strength = np.array([lookup.get(lab, (-1, 0.0))[1] for lab in labels])
    pad = lambda a: np.concatenate([a, np.zeros((a.shape[0], 1))], axis=1)  # noqa: E731
    log2_b = strength[:, None] * pad(adata.varm["log2_b_change"])[:, prog].T
    log2_g = strength[:, None] * pad(adata.varm["log2_gamma_change"])[:, prog].T
    phase = adata.obs["phase"].astype(str).to_numpy()
    var = adata.var
    log2_b += np.where(phase == "S", 1, 0)[:, None] * var["cell_cycle_log2_S"].to_numpy()
    log2_b += np.where(phase == "G2M", 1, 0)[:, None] * var["cell_cycle_log2_G2M"].to_numpy()
    log2_b += np.log2(var["burst_size"].to_numpy())
    log2_g += np.log2(var["degradation_rate"].to_numpy())
    shape = (1, n_draws, *log2_b.shape)
    return {
        "burst_size": 2.0 ** (log2_b + noise * rng.standard_normal(shape)),
        "degradation_rate": 2.0 ** (log2_g + noise * rng.standard_normal(shape)),
    }


def oracle(args: argparse.Namespace) -> int:
    """biVI's kinetic test on draws from the simulator's truth, at several noise levels."""
    import arviz as az
    import xarray as xr

    from pybivi import datasets
    from pybivi.tl import de

    adata = datasets.simulate_perturbseq(n_cells=args.cells, n_genes=args.genes, seed=args.seed)
    adata = adata[~adata.obs["doublet"].to_numpy()].copy()
    programs = [str(p) for p in adata.uns["simulation"]["programs"]]
    print(
        f"oracle: {adata.n_obs} singlets x {adata.n_vars} genes, 5 draws per cell, "
        f"{args.samples} pooled draws per group, 10,000 pairs; delta 1, BF > 3"
    )
    rng = np.random.default_rng(args.seed)
    for noise in args.noise:
        draws = _truth_draws(adata, noise, 5, rng)
        dims = ("chain", "draw", "cell", "gene")
        post = xr.Dataset(
            {k: (dims, v) for k, v in draws.items()}, coords={"gene": list(adata.var_names)}
        )
        const = xr.Dataset({"program": (("cell",), adata.obs["program"].astype(str).to_numpy())})
        idata = az.InferenceData(posterior=post, constant_data=const)
        t0 = time.perf_counter()
        table = de.kinetic(idata, groupby="program", group=programs, method="pairs", seed=args.seed)
        elapsed = time.perf_counter() - t0
        scores = datasets.truth_scores(table, adata)
        pivot = scores.pivot(index="program", columns="target", values=["precision", "recall"])
        print(
            f"\nnoise sd {noise} (log2): kinetic test on {len(programs)} programs in "
            f"{elapsed:.1f} s"
        )
        print(pivot.round(2).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(docs_output.run(main))

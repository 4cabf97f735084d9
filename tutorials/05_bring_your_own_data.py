# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Bring your own data: from a count file to a report with `pybivi fit`
#
# Your screen comes out of a quantifier as an AnnData (`.h5ad`) or loom file with a layer of
# nascent (unspliced) and one of mature (spliced) counts, and a table of which guide each cell
# received. This tutorial goes from such a file to a report, the way you would on your own
# data. You will:
#
# 1. see which layer names pybivi understands and how to rename others;
# 2. check a file before fitting;
# 3. run `pybivi fit` on it from the command line (here through `subprocess`);
# 4. read the report folder: the HTML report, the metrics, the saved models and the AnnData
#    with the representations and kinetic parameters written back.
#
# We have no real screen in the repository, so we write a small simulated one in the layout a
# kb-python run produces (layers `mature` and `nascent`) as a stand-in for yours.

# %%
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import pybivi
from pybivi import datasets

FAST = os.environ.get("PYBIVI_TUTORIAL_FAST") == "1"
OUT = Path(os.environ.get("PYBIVI_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="pybivi_byod_"))
OUT.mkdir(parents=True, exist_ok=True)
N_CELLS, N_GENES = (300, 100) if FAST else (2000, 600)
EPOCHS = 3 if FAST else 40

# %% [markdown]
# ## 1. The stand-in for your file
#
# What the common tools write:
#
# | tool | nascent layer | mature layer |
# |---|---|---|
# | velocyto (`.loom`) | `unspliced` | `spliced` |
# | STARsolo `--soloFeatures Velocyto` (via scanpy/scvelo) | `unspliced` | `spliced` |
# | kb-python `--workflow nac` | `nascent` | `mature` |
# | kb-python `--workflow lamanno` | `unspliced` | `spliced` |
#
# `pybivi.datasets.read` reads `.h5ad` and `.loom` and renames `nascent`/`mature` (and
# `intron`/`exon`) to `unspliced`/`spliced`; for any other naming, rename the layers yourself
# before writing the file, as in the last lines below. The perturbation labels go in an `obs`
# column; here `guide_target`, with `non-targeting` for the controls.

# %%
screen = datasets.simulate_perturbseq(n_cells=N_CELLS, n_genes=N_GENES, n_programs=3, seed=5)
screen.obs["guide_target"] = screen.obs["perturbation"].astype(str).replace(
    {"NT": "non-targeting"}
)
screen.layers["nascent"] = screen.layers.pop("unspliced")
screen.layers["mature"] = screen.layers.pop("spliced")
# Keep only what a quantifier would give you (the simulator's truth would be a spoiler).
for key in ("perturbation", "phase", "capture_efficiency"):
    del screen.obs[key]
screen.uns.clear()
screen.varm.clear()
screen.var = screen.var[[]]
path = OUT / "my_screen.h5ad"
screen.write_h5ad(path)
print(screen)

# %% [markdown]
# ## 2. Check the file
#
# Read it as `pybivi fit` will, and check the counts are raw integers: a common mistake is to
# pass normalised or log-transformed layers, which `pp.validate_counts` reports by name.

# %%
adata = datasets.read(path)
print(list(adata.layers.keys()), adata.obs["guide_target"].value_counts().head(4).to_dict())
pybivi.pp.validate_counts(adata)
assert set(adata.layers.keys()) == {"unspliced", "spliced"}

# %% [markdown]
# ## 3. Run `pybivi fit`
#
# `pybivi fit` prepares the data (doublets out, programs if given, cell-cycle scoring with the
# Tirosh markers, highly variable genes), fits the chosen models and writes the report: the
# representations and their scores (the paper's figure 2), the Bayes-factor tests of burst size
# and relative degradation rate against mean expression (figure 3; `--no-de` skips them) and,
# with `--ppc`, a posterior-predictive check of ContrastiveBiVI.
# `--control` names the control label (repeat it for several); `--program-key` names an `obs`
# column of gene programs when you have one, which adds the program ARI to the report (perturbed
# cells without a program are then dropped, as in the paper). Our gene names are not real
# symbols, so we switch off cell-cycle scoring. In a terminal this is one line:
#
# ```bash
# pybivi fit my_screen.h5ad --perturbation-key guide_target --control non-targeting \
#     --program-key program --models ContrastiveBiVI,ContrastiveVI --ppc --out report
# ```

# %%
report = OUT / "report"
command = [
    sys.executable, "-m", "pybivi.cli", "fit", str(path),
    "--perturbation-key", "guide_target",
    "--control", "non-targeting",
    "--program-key", "program",
    "--no-cell-cycle",
    "--models", "ContrastiveBiVI,ContrastiveVI",
    "--ppc",
    "--epochs", str(EPOCHS),
    "--n-top-genes", str(int(0.8 * N_GENES)),
    "--embedding", "pca" if FAST else "umap",
    "--out", str(report),
]
if FAST:
    command.append("--quiet")
result = subprocess.run(command, capture_output=True, text=True)
print(result.stdout[-2000:])
assert result.returncode == 0, result.stderr[-4000:]

# %% [markdown]
# ## 4. Read the report folder

# %%
files = sorted(p.relative_to(report).as_posix() for p in report.rglob("*") if p.is_file())
print("report files:", *files, sep="\n  ")
assert (report / "index.html").is_file()

metrics = json.loads((report / "metrics.json").read_text())
for row in metrics["per_seed"]:
    print(row)
    assert -1.0 <= row["ari"] <= 1.0

# %% [markdown]
# `metrics.json` also holds the number of genes called per program by each test (figure 3)
# and the calibration summary of the posterior-predictive check (see tutorial 3).

# %%
print("genes called per program:", metrics["figure3"]["counts"])
for statistic, row in metrics["ppc"]["summary"].items():
    tails = row["fraction_low_tail"] + row["fraction_high_tail"] + row["fraction_central_95"]
    assert abs(tails - 1.0) < 1e-9, statistic
    print(f"{statistic:22s} central 95%: {row['fraction_central_95']:.2f}")

# %% [markdown]
# `adata.h5ad` is the prepared data with the results written back: each model's
# representation in `obsm["X_<Model>"]` and ContrastiveBiVI's posterior-mean kinetic
# parameters at the reference library in layers `ContrastiveBiVI_<parameter>`. The fitted
# models are saved under `models/` and load back onto that AnnData.

# %%
result_adata = datasets.read(report / "adata.h5ad")
print(result_adata)
burst = result_adata.layers["ContrastiveBiVI_burst_size"]
splicing = result_adata.layers["ContrastiveBiVI_splicing_rate"]
# beta/k = 1/theta is one value per gene: every cell has the same splicing rate.
assert np.allclose(splicing, splicing[:1], rtol=1e-4)
assert (burst > 0).all()

model = pybivi.ContrastiveBiVI.load(report / "models" / "ContrastiveBiVI_seed0", result_adata)
salient = model.get_latent_representation(kind="salient")
assert np.allclose(salient, result_adata.obsm["X_ContrastiveBiVI"], atol=1e-5)
print(model)

"""The `pybivi` command line end to end on tiny sizes, its errors, and the report writer."""

import json
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from pybivi import cli, pl
from pybivi.report import Report, table_html

torch.set_num_threads(1)


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "fit", "simulate"):
        assert command in text
    for command in ("demo", "fit", "simulate"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "usage: pybivi " + command in capsys.readouterr().out


def test_bad_model_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--models", "SCVI,FooVI"])
    assert exc.value.code == 2
    assert "unknown model(s) ['FooVI']" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    import pybivi.cme

    if not hasattr(pybivi.cme, "load_default_approximator"):
        pytest.skip("the bursty approximator (pybivi.cme.load_default_approximator) is absent")
    out = tmp_path_factory.mktemp("demo")
    rc = cli.main([
        "demo", "--cells", "300", "--genes", "40", "--epochs", "1", "--embedding", "pca",
        "--out", str(out), "--quiet",
    ])
    assert rc == 0
    return out


def test_demo_writes_report_folder(demo_dir):
    page = (demo_dir / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert {"figure2_embeddings.png", "figure2e_ari.png", "figure2f_entropy.png"} <= set(images)
    for name in images:  # every figure the page shows lies beside it
        assert (demo_dir / name).stat().st_size > 1000
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    assert metrics["models"] == list(cli.MODEL_NAMES)
    for row in metrics["per_seed"]:
        assert -1.0 <= row["ari"] <= 1.0
        assert 0.0 <= row["mixing_entropy"] <= np.log(3) + 1e-9
    for name in cli.MODEL_NAMES:
        assert (demo_dir / "models" / f"{name}_seed0" / "config.json").exists()
    # Figure 3 (pybivi.tl.de) and the kinetic truth comparison are sections of the same page.
    assert "error" not in metrics["figure3"], metrics["figure3"]
    assert {"b", "gamma"} <= set(metrics["kinetic_recovery"])
    assert "Figure 3" in page and "Kinetic parameters against the truth" in page
    assert json.loads((demo_dir / "report.json").read_text())["sections"][0]["key"] == "data"


def test_demo_anndata_has_representations_and_kinetics(demo_dir):
    a = ad.read_h5ad(demo_dir / "adata.h5ad")
    assert a.obsm["X_ContrastiveBiVI"].shape == (a.n_obs, 10)
    assert a.obsm["X_BiVI"].shape == (a.n_obs, 10)
    # Controls have a salient representation of exactly zero.
    ctrl = (a.obs["perturbation"] == "NT").to_numpy()
    assert np.all(a.obsm["X_ContrastiveBiVI"][ctrl] == 0)
    assert np.any(a.obsm["X_ContrastiveBiVI"][~ctrl] != 0)
    b = a.layers["ContrastiveBiVI_burst_size"]
    assert b.shape == a.shape and np.all(np.isfinite(b)) and np.all(b > 0)
    # Weak, unannotated perturbations and doublets were dropped by prepare().
    assert set(a.obs["program"]) <= {"control"} | {f"program{i}" for i in range(1, 7)}


def test_simulate_then_fit_a_user_file(tmp_path, capsys):
    data = tmp_path / "screen.h5ad"
    assert cli.main(["simulate", str(data), "--cells", "200", "--genes", "30", "--quiet"]) == 0
    out = tmp_path / "fit"
    rc = cli.main([
        "fit", str(data), "--perturbation-key", "perturbation", "--control", "NT",
        "--program-key", "program", "--models", "scvi", "--epochs", "1", "--embedding", "pca",
        "--no-cell-cycle", "--out", str(out), "--quiet", "--frequency-init", "data",
    ])
    assert rc == 0
    a = ad.read_h5ad(out / "adata.h5ad")
    assert "X_SCVI" in a.obsm and (out / "index.html").exists()
    assert "scVI (M)" in capsys.readouterr().out
    # --frequency-init data reached the model: its decoder started at the data's frequencies,
    # so after one epoch the bias still follows the log share of each gene's counts.
    import pybivi

    model = pybivi.SCVI.load(out / "models" / "SCVI_seed0", a)
    totals = np.asarray(a.layers["spliced"].sum(0)).ravel() + 0.5
    bias = model.module.decoder.heads["mature"].bias.detach().numpy()
    assert np.corrcoef(bias, np.log(totals))[0, 1] > 0.9


def test_fit_errors_name_the_problem(tmp_path, capsys):
    assert cli.main(["fit", str(tmp_path / "nope.h5ad"), "--perturbation-key", "p",
                     "--control", "NT"]) == 2
    assert "no such file" in capsys.readouterr().err
    counts = np.random.default_rng(0).poisson(1.0, size=(20, 5))
    a = ad.AnnData(X=counts.astype(np.float32), layers={"spliced": counts})
    a.obs["perturbation"] = ["NT"] * 10 + ["A"] * 10
    a.write_h5ad(tmp_path / "nou.h5ad")
    assert cli.main(["fit", str(tmp_path / "nou.h5ad"), "--perturbation-key", "perturbation",
                     "--control", "NT"]) == 2
    assert "no 'unspliced' layer" in capsys.readouterr().err
    a.layers["unspliced"] = counts
    a.write_h5ad(tmp_path / "ok.h5ad")
    assert cli.main(["fit", str(tmp_path / "ok.h5ad"), "--perturbation-key", "guide",
                     "--control", "NT"]) == 2
    assert "perturbation_key 'guide'" in capsys.readouterr().err
    assert cli.main(["fit", str(tmp_path / "ok.h5ad"), "--perturbation-key", "perturbation",
                     "--control", "CTRL"]) == 2
    assert "control label(s) ['CTRL']" in capsys.readouterr().err


def test_report_sections_add_replace_reopen(tmp_path):
    rep = Report(tmp_path, title="T <1>")
    coords = np.random.default_rng(0).normal(size=(30, 2))
    fig = pl.embedding_grid([(coords, np.repeat(["a", "b", "c"], 10), "panel")], ncols=1)
    rep.add_section("First", "<p>one</p>", [(fig, "f1.png", "caption & more")])
    rep.add_section("Second", table_html(pd.DataFrame({"x": [1.23456]}, index=["r"])))
    rep.write()
    again = Report.open(tmp_path)
    again.add_section("Figure 3", "<p>later</p>", [(tmp_path / "f1.png", "reused")], position=1)
    again.add_section("First", "<p>replaced</p>")  # same key: replaced in place
    page = again.write().read_text()
    assert again.section_keys() == ["First", "Figure 3", "Second"]
    assert page.index("replaced") < page.index("later") < page.index("1.235")
    assert "T &lt;1&gt;" in page and "caption &amp; more" not in page  # replaced section
    assert "one" not in page and (tmp_path / "f1.png").exists()
    with pytest.raises(FileNotFoundError, match="report.json"):
        Report.open(tmp_path / "empty")


def test_bar_charts_lay_out_their_bars(tmp_path):
    table = pd.DataFrame({"model": ["A", "A", "B", "B"], "seed": [0, 1, 0, 1],
                          "ari": [0.2, 0.4, 0.6, 0.8]})
    fig = pl.metric_bars(table, "ari", tmp_path / "m.png", order=["B", "A"], labels={"A": "a"})
    ax = fig.axes[0]
    bars = ax.patches
    assert [b.get_height() for b in bars] == pytest.approx([0.7, 0.3])
    assert [b.get_x() + b.get_width() / 2 for b in bars] == pytest.approx([0.0, 1.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["B", "a"]
    assert ax.get_legend() is None and (tmp_path / "m.png").exists()
    purity = pd.DataFrame({"model": ["A", "B", "A", "B"], "program": ["p1", "p1", "p2", "p2"],
                           "purity": [0.1, 0.2, 0.3, 0.4]})
    ax = pl.purity_bars(purity, order=["B", "A"], kinds={"p1": "mixed"}).axes[0]
    centres = [b.get_x() + b.get_width() / 2 for b in ax.patches]
    assert centres == pytest.approx([-0.2, 0.8, 0.2, 1.2])  # model B's bars, then A's
    assert [b.get_height() for b in ax.patches] == pytest.approx([0.2, 0.4, 0.1, 0.3])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["p1\n(mixed)", "p2"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["B", "A"]


def test_embed_pca_recovers_the_dominant_axis():
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(scale=10, size=200), rng.normal(size=(200, 4))])
    xy = pl.embed(x, method="pca")
    assert xy.shape == (200, 2)
    assert abs(np.corrcoef(xy[:, 0], x[:, 0])[0, 1]) > 0.99
    with pytest.raises(ValueError, match="method"):
        pl.embed(x, method="tsne")


def test_kinetic_recovery_bookkeeping_on_exact_estimates(tmp_path):
    # Layers holding each cell's true kinetics at a fixed library: the recovered
    # program-vs-control changes must equal the truth exactly.
    from pybivi import datasets
    from pybivi.report._sections import add_kinetic_recovery, kinetic_recovery

    a = datasets.simulate_perturbseq(n_cells=150, n_genes=40, seed=0, doublet_fraction=0.0)
    a = a[a.obs["program"] != "unassigned"].copy()
    table = pd.DataFrame(a.uns["simulation"]["perturbations"])
    progs = a.uns["simulation"]["programs"]
    strength = {p: table.loc[table.annotated & (table.program == p), "strength"].mean()
                for p in progs}
    col = np.array([progs.index(p) if p in progs else -1 for p in a.obs["program"]])
    s = np.array([strength.get(p, 0.0) for p in a.obs["program"]])[:, None]
    lb = np.column_stack([a.varm["log2_b_change"], np.zeros(a.n_vars)])[:, col].T
    lg = np.column_stack([a.varm["log2_gamma_change"], np.zeros(a.n_vars)])[:, col].T
    a.layers["ContrastiveBiVI_burst_size"] = a.var["burst_size"].to_numpy() * 2.0 ** (s * lb)
    a.layers["ContrastiveBiVI_degradation_rate"] = (
        a.var["degradation_rate"].to_numpy() * 2.0 ** (s * lg)
    )
    ctrl = (a.obs["perturbation"] == "NT").to_numpy()
    rec = kinetic_recovery(a, "program", ctrl)
    np.testing.assert_allclose(rec["est_b"], rec["true_b"], atol=1e-9)
    np.testing.assert_allclose(rec["est_gamma"], rec["true_gamma"], atol=1e-9)
    report = Report(tmp_path)
    summary = add_kinetic_recovery(report, a, "program", ctrl)
    assert summary["b"]["pearson"] == pytest.approx(1.0)
    assert summary["gamma"]["sign_agreement"] == 1.0
    assert (tmp_path / "kinetic_recovery.png").exists()


def test_approximator_train_help_is_delegated(capsys):
    pytest.importorskip("pybivi.cme.training")
    with pytest.raises(SystemExit) as exc:
        cli.main(["approximator", "train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: pybivi approximator train" in out and "--epochs" in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--bogus"])
    assert exc.value.code == 2

"""Training through Lightning: seeds, checkpoints and resume, device arguments, DDP on CPUs."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import pybivi
from pybivi.training_data import ShardedCells

SMALL = dict(batch_size=16, progress_bar=False, device="cpu", kl_warmup_epochs=2)


def _model(make_adata, n_cells=64, seed=0):
    adata = make_adata(n_cells=n_cells)
    pybivi.ContrastiveBiVI.setup_anndata(adata)
    return pybivi.ContrastiveBiVI(adata, n_hidden=8, seed=seed)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}


class StopAtEpoch(Callback):
    """Interrupts training when ``epoch`` starts, as a killed job would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("killed")


class SaveRankWeights(Callback):
    """Each process writes its final weights to ``folder/rank<r>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu() for k, v in pl_module.module.state_dict().items()}
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")


def test_the_same_seed_gives_the_same_weights_and_history(make_adata):
    runs = []
    for _ in range(2):
        model = _model(make_adata)
        history = model.train(max_epochs=3, validation_fraction=0.25, seed=3, **SMALL)
        runs.append((history, _weights(model)))
    (h1, w1), (h2, w2) = runs
    assert h1.equals(h2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    other = _model(make_adata)
    other.train(max_epochs=3, validation_fraction=0.25, seed=4, **SMALL)
    assert not torch.equal(_weights(other)["log_theta"], w1["log_theta"])


def test_a_killed_run_resumed_from_its_checkpoint_matches_an_uninterrupted_run(
    make_adata, tmp_path
):
    settings = dict(max_epochs=5, validation_fraction=0.25, seed=1, **SMALL)
    whole = _model(make_adata)
    whole.train(**settings)
    killed = _model(make_adata)
    with pytest.raises(RuntimeError, match="killed"):
        killed.train(checkpoint_dir=tmp_path, callbacks=[StopAtEpoch(3)], **settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]
    # A new process: a fresh model (another initialisation) continues from last.ckpt.
    resumed = _model(make_adata, seed=99)
    resumed.train(checkpoint_dir=tmp_path, resume=True, **settings)
    assert len(resumed.history) == 5
    np.testing.assert_allclose(
        resumed.history.to_numpy(dtype=float), whole.history.to_numpy(dtype=float), rtol=1e-6
    )
    w_whole, w_resumed = _weights(whole), _weights(resumed)
    for key in w_whole:
        torch.testing.assert_close(w_resumed[key], w_whole[key], rtol=1e-5, atol=1e-6)


def test_checkpoint_dir_never_overwrites_what_it_did_not_write(make_adata, tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes")
    model = _model(make_adata)
    with pytest.raises(FileExistsError, match="did not write"):
        model.train(max_epochs=1, checkpoint_dir=tmp_path, **SMALL)
    assert mine.read_text() == "my notes"
    folder = tmp_path / "ckpt"
    model.train(max_epochs=1, checkpoint_dir=folder, **SMALL)
    with pytest.raises(FileExistsError, match="resume=True"):
        model.train(max_epochs=1, checkpoint_dir=folder, **SMALL)
    # A checkpoint of another set-up (here another seed) is refused with a clear message.
    with pytest.raises(ValueError, match="another model or training set-up"):
        model.train(max_epochs=2, checkpoint_dir=folder, resume=True, **{**SMALL, "seed": 5})
    with pytest.raises(FileNotFoundError):
        model.train(max_epochs=1, resume=tmp_path / "missing.ckpt", **SMALL)


def test_device_arguments_are_checked(make_adata):
    model = _model(make_adata)
    fast = {k: v for k, v in SMALL.items() if k != "device"}
    with pytest.raises(ValueError, match="not both"):
        model.train(max_epochs=1, device="cpu", accelerator="cpu", **fast)
    with pytest.raises(ValueError, match="accelerator must be"):
        model.train(max_epochs=1, accelerator="abacus", **fast)
    with pytest.raises(TypeError, match="Callback"):
        model.train(max_epochs=1, callbacks=[print], **fast)
    with pytest.raises(ValueError, match="fewer than 2 cells per step"):
        model.train(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_notebook",
                    **{**fast, "batch_size": 3})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            model.train(max_epochs=1, accelerator="gpu", **fast)
    model.train(max_epochs=1, accelerator="cpu", **fast)
    assert model.device == torch.device("cpu") and model.is_trained


def test_each_process_gets_an_equal_disjoint_share_that_changes_every_epoch():
    indices = np.arange(3, 106)  # 103 cells: not a multiple of the 4 processes

    def shares(epoch, world):
        out = []
        for rank in range(world):
            trainer = types.SimpleNamespace(global_rank=rank, world_size=world)
            plan = types.SimpleNamespace(_trainer=trainer, current_epoch=epoch)
            out.append(ShardedCells(None, indices, 16, seed=7, plan=plan).share(epoch))
        return out

    parts = shares(epoch=0, world=4)
    union = np.concatenate(parts)
    assert {len(p) for p in parts} == {103 // 4}
    assert len(np.unique(union)) == len(union) and set(union) <= set(indices)
    # The shares are cut from the one permutation all processes draw from (seed, epoch).
    np.testing.assert_array_equal(union, shares(epoch=0, world=1)[0][: len(union)])
    assert not np.array_equal(shares(epoch=1, world=4)[0], parts[0])


def test_two_cpu_processes_match_one_and_agree_on_the_weights(tmp_path):
    from pybivi.datasets import simulate_perturbseq

    adata = simulate_perturbseq(n_cells=600, n_genes=40, n_programs=2, seed=0)
    pybivi.ContrastiveBiVI.setup_anndata(adata)
    settings = dict(
        max_epochs=6, batch_size=64, validation_fraction=0.2, split_seed=0,
        progress_bar=False, accelerator="cpu", kl_warmup_epochs=2,
    )
    single = pybivi.ContrastiveBiVI(adata, n_hidden=16)
    single.train(**settings)
    pair = pybivi.ContrastiveBiVI(adata, n_hidden=16)
    initial = _weights(pair)
    pair.train(devices=2, strategy="ddp_notebook", callbacks=[SaveRankWeights(tmp_path)],
               **settings)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    trained = _weights(pair)
    for key in ranks[0]:
        torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0)
        torch.testing.assert_close(trained[key], ranks[0][key], rtol=0, atol=0)
    assert not torch.equal(trained["log_theta"], initial["log_theta"])
    np.testing.assert_array_equal(pair.validation_indices, single.validation_indices)
    h1, h2 = single.history, pair.history
    assert len(h2) == 6 and h2["validation_loss"].notna().all()
    # The loss is per cell of the whole training set either way: same scale, same end point.
    assert h2["train_loss"].iloc[0] == pytest.approx(h1["train_loss"].iloc[0], rel=0.05)
    assert h2["validation_loss"].iloc[-1] == pytest.approx(h1["validation_loss"].iloc[-1], rel=0.02)
    assert h2["validation_loss"].iloc[-1] < h2["validation_loss"].iloc[0]

from __future__ import annotations

import csv
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mrissl
from mrissl.diagnostics import CollapseMonitor, effective_rank, rankme

pl = pytest.importorskip("lightning.pytorch", reason="needs the lightning extra")
loggers = pytest.importorskip("lightning.pytorch.loggers")

from mrissl.integrations.lightning import EffectiveRankCallback  # noqa: E402

HERE = Path(__file__).parent


class _Module(pl.LightningModule):
    """A linear encoder; it keeps every feature it produced, per epoch, for the reference."""

    def __init__(self, levels=False):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(6, 4)
        self.levels = levels
        self.train_seen: dict[int, list[torch.Tensor]] = {}
        self.val_seen: dict[int, list[torch.Tensor]] = {}
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        z = self.encoder(batch[0])
        self.train_seen.setdefault(self.current_epoch, []).append(z.detach().clone())
        loss = z.pow(2).mean()
        self.losses.append(loss.detach().clone())
        return {"loss": loss, "embeddings": z}

    def validation_step(self, batch, batch_idx):
        z = self.encoder(batch[0])
        if not self.trainer.sanity_checking:
            self.val_seen.setdefault(self.current_epoch, []).append(z.detach().clone())
        self.last_val = z

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) * torch.linspace(0.2, 2, 6)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)


def _trainer(tmp_path, callbacks, epochs=2, **kwargs):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=loggers.CSVLogger(tmp_path, name="logs", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def _logged(tmp_path) -> dict[str, dict[int, float]]:
    """Every metric of the CSV logger: name -> {epoch: value}."""
    out: dict[str, dict[int, float]] = {}
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("epoch", "step") and value != "":
                    out.setdefault(key, {})[int(row["epoch"])] = float(value)
    return out


def test_fit_logs_the_effective_rank_and_rankme_of_each_epoch(tmp_path):
    module = _Module()
    _trainer(tmp_path, [EffectiveRankCallback("embeddings")]).fit(module, _loader())
    logged = _logged(tmp_path)
    assert set(logged) == {"train/embeddings/effective_rank", "train/embeddings/rankme"}
    for epoch in (0, 1):
        z = torch.cat(module.train_seen[epoch]).double()
        assert z.shape == (32, 4)
        expected_er = float(effective_rank(z, center=True))
        expected_rm = float(rankme(z, center=True))
        assert logged["train/embeddings/effective_rank"][epoch] == pytest.approx(expected_er, 1e-9)
        assert logged["train/embeddings/rankme"][epoch] == pytest.approx(expected_rm, 1e-9)
    # the two epochs saw different weights, so different values: the meter was reset
    assert (
        logged["train/embeddings/effective_rank"][0] != logged["train/embeddings/effective_rank"][1]
    )


def test_monitor_verdict_is_logged_and_equals_a_monitor_fed_directly(tmp_path):
    module = _Module()
    monitor = CollapseMonitor(dim=4, window=2, floor=1.0, warn=False)
    callback = EffectiveRankCallback("embeddings", monitor=monitor)
    _trainer(tmp_path, [callback]).fit(module, _loader())
    reference = CollapseMonitor(dim=4, window=2, floor=1.0, warn=False)
    steps = [z for epoch in (0, 1) for z in module.train_seen[epoch]]
    for loss, z in zip(module.losses, steps, strict=True):
        reference.step(loss, z)
    assert monitor.ranks == pytest.approx(reference.ranks, rel=1e-12)
    assert monitor.losses == pytest.approx(reference.losses, rel=1e-12)
    logged = _logged(tmp_path)
    assert logged["train/collapse/complete"][1] == float(reference.status.complete)
    assert logged["train/collapse/dimensional"][1] == float(reference.status.dimensional)


def test_validation_stage_with_a_function_of_several_levels_skips_the_sanity_check(tmp_path):
    module = _Module()

    def levels(pl_module, batch, outputs):
        z = pl_module.last_val
        return {"a": z, "b": z[:, :2]}

    callback = EffectiveRankCallback(levels, stage="validation", prefix="")
    trainer = _trainer(tmp_path, [callback], num_sanity_val_steps=2)
    trainer.fit(module, _loader(), _loader(seed=1))
    logged = _logged(tmp_path)
    assert set(logged) == {"a/effective_rank", "a/rankme", "b/effective_rank", "b/rankme"}
    for epoch in (0, 1):
        z = torch.cat(module.val_seen[epoch]).double()
        assert logged["a/effective_rank"][epoch] == pytest.approx(float(effective_rank(z)), 1e-9)
        assert logged["b/effective_rank"][epoch] == pytest.approx(
            float(effective_rank(z[:, :2])), 1e-9
        )


def test_features_that_cannot_be_found_name_the_argument(tmp_path):
    trainer = _trainer(tmp_path, [EffectiveRankCallback("nowhere")], epochs=1)
    with pytest.raises(ValueError, match="features='nowhere'"):
        trainer.fit(_Module(), _loader())


def test_bad_stage_and_features_arguments():
    with pytest.raises(ValueError, match="stage"):
        EffectiveRankCallback("z", stage="test")
    with pytest.raises(TypeError, match="features"):
        EffectiveRankCallback(3)
    with pytest.raises(ValueError, match="eps"):
        EffectiveRankCallback("z", eps=-1.0)


def test_import_without_lightning_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "mrissl.integrations.lightning")
    with pytest.raises(ImportError, match=r'pip install "mrissl\[lightning\]"'):
        importlib.import_module("mrissl.integrations.lightning")


def test_mrissl_does_not_import_the_integrations():
    code = (
        "import sys, mrissl, mrissl.nn, mrissl.losses, mrissl.diagnostics, mrissl.masking;"
        "bad = [m for m in sys.modules if m.startswith(('mrissl.integrations', 'lightning',"
        " 'ignite', 'torchmetrics'))]; print(bad); sys.exit(bool(bad))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(mrissl.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available on this platform",
)
def test_ddp_two_processes_log_the_rank_of_the_global_epoch(tmp_path):
    pytest.importorskip("torchmetrics")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(mrissl.__file__).parents[1]), str(HERE)]),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("MASTER_PORT", None)
    result = subprocess.run(
        [sys.executable, str(HERE / "_lightning_ddp_script.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = [torch.load(tmp_path / f"features_rank{r}.pt") for r in (0, 1)]
    logged = _logged(tmp_path)
    for epoch in (0, 1):
        local = [torch.cat(s[epoch]).double() for s in seen]
        assert [z.shape[0] for z in local] == [32, 32]  # each process saw half of the 64
        z = torch.cat(local)
        expected = float(effective_rank(z))
        assert logged["train/embeddings/effective_rank"][epoch] == pytest.approx(expected, 1e-9)
        assert logged["torchmetrics/effective_rank"][epoch] == pytest.approx(expected, 1e-9)
        # and not the rank of what rank 0 saw alone
        assert float(effective_rank(local[0])) != pytest.approx(expected, 1e-6)
        assert logged["train/embeddings/rankme"][epoch] == pytest.approx(
            float(rankme(z, center=True)), 1e-9
        )


def test_the_monitor_history_is_saved_in_checkpoints_and_restored(tmp_path):
    monitor = CollapseMonitor(dim=4, window=2, warn=False)
    trainer = _trainer(tmp_path, [EffectiveRankCallback("embeddings", monitor=monitor)])
    trainer.fit(_Module(), _loader())
    assert len(monitor.ranks) == 4  # 8 steps, windows of 2
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    fresh = CollapseMonitor(dim=4, window=2, warn=False)
    resumed = _trainer(tmp_path, [EffectiveRankCallback("embeddings", monitor=fresh)], epochs=3)
    resumed.fit(_Module(), _loader(), ckpt_path=tmp_path / "last.ckpt")
    assert fresh.ranks[:4] == monitor.ranks
    assert len(fresh.ranks) == 6  # the third epoch added two windows
    assert fresh.steps == 12

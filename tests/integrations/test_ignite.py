from __future__ import annotations

import importlib
import logging
import sys

import pytest
import torch

from mrissl.diagnostics import CollapseMonitor, effective_rank, rankme

pytest.importorskip("ignite", reason="needs the ignite extra")
engines = pytest.importorskip("monai.engines")
from ignite.engine import Events  # noqa: E402

from mrissl.integrations.ignite import EffectiveRankHandler  # noqa: E402

EPOCHS, STEPS, BATCH = 2, 4, 8


class _Net(torch.nn.Module):
    """Encoder then head; the encoder's output of every forward pass is kept for the reference."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(6, 4)
        self.head = torch.nn.Linear(4, 2)
        self.seen: list[torch.Tensor] = []
        self.preds: list[torch.Tensor] = []
        self.latest: torch.Tensor | None = None

    def forward(self, x):
        z = self.encoder(x)
        self.latest = z
        self.seen.append(z.detach().clone())
        out = self.head(z)
        self.preds.append(out.detach().clone())
        return out


def _loader(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS * BATCH, 6, generator=g) * torch.linspace(0.2, 2, 6)
    y = torch.randint(0, 2, (STEPS * BATCH,), generator=g)
    data = [{"image": x[i], "label": y[i]} for i in range(len(x))]
    return torch.utils.data.DataLoader(data, batch_size=BATCH)


def _trainer(net, handlers, decollate=True):
    return engines.SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=EPOCHS,
        train_data_loader=_loader(),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=handlers,
        decollate=decollate,
    )


def _record_metrics(engine):
    history: list[dict[str, float]] = []
    engine.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: history.append(dict(e.state.metrics))
    )
    return history


@pytest.mark.parametrize("decollate", [True, False])
def test_supervised_trainer_metrics_equal_a_direct_computation(decollate):
    net = _Net()
    handler = EffectiveRankHandler(lambda engine: net.latest, name="encoder")
    trainer = _trainer(net, [handler], decollate=decollate)
    history = _record_metrics(trainer)
    trainer.run()
    assert len(history) == EPOCHS
    assert len(net.seen) == EPOCHS * STEPS
    for epoch, metrics in enumerate(history):
        z = torch.cat(net.seen[epoch * STEPS : (epoch + 1) * STEPS]).double()
        assert set(metrics) == {"encoder/effective_rank", "encoder/rankme"}
        assert metrics["encoder/effective_rank"] == pytest.approx(float(effective_rank(z)), 1e-9)
        assert metrics["encoder/rankme"] == pytest.approx(float(rankme(z, center=True)), 1e-9)
    assert history[0]["encoder/effective_rank"] != history[1]["encoder/effective_rank"]


def test_default_features_are_the_prediction_and_the_monitor_gets_the_loss(caplog):
    net = _Net()
    monitor = CollapseMonitor(dim=2, window=2, floor=10.0, warn=False)
    logger = logging.getLogger("test_ignite_rank")
    handler = EffectiveRankHandler(monitor=monitor, prefix="train/", logger=logger)
    trainer = _trainer(net, [handler])
    history = _record_metrics(trainer)
    losses: list[torch.Tensor] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output[0]["loss"])
    )
    with caplog.at_level(logging.INFO, logger="test_ignite_rank"):
        trainer.run()
    reference = CollapseMonitor(dim=2, window=2, floor=10.0, warn=False)
    for loss, pred in zip(losses, net.preds, strict=True):
        reference.step(loss, pred)
    assert monitor.losses == pytest.approx(reference.losses, rel=1e-12)
    assert monitor.ranks == pytest.approx(reference.ranks, rel=1e-6)
    last = history[-1]
    assert last["train/collapse/complete"] == float(reference.status.complete)
    assert last["train/collapse/dimensional"] == float(reference.status.dimensional)
    assert "train/features/effective_rank" in last
    assert sum("train/features/effective_rank" in r.getMessage() for r in caplog.records) == 2


def test_supervised_evaluator_with_several_levels():
    net = _Net().eval()

    def levels(engine):
        return {"encoder": net.latest, "first_two": net.latest[:, :2]}

    evaluator = engines.SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=_loader(seed=1),
        network=net,
        val_handlers=[EffectiveRankHandler(levels, prefix="val/")],
    )
    evaluator.run()
    z = torch.cat(net.seen).double()
    metrics = evaluator.state.metrics
    assert metrics["val/encoder/effective_rank"] == pytest.approx(float(effective_rank(z)), 1e-9)
    assert metrics["val/first_two/effective_rank"] == pytest.approx(
        float(effective_rank(z[:, :2])), 1e-9
    )


def test_missing_features_and_bad_arguments_are_named():
    engine = engines.SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=_loader(), network=_Net()
    )
    EffectiveRankHandler(lambda e: "not a tensor").attach(engine)
    with pytest.raises(TypeError, match=r"features=.*must give a"):
        engine.run()
    with pytest.raises(TypeError, match="features"):
        EffectiveRankHandler(features=3)
    with pytest.raises(TypeError, match="logger"):
        EffectiveRankHandler(logger="stdout")


def test_import_without_ignite_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ignite", None)
    monkeypatch.delitem(sys.modules, "mrissl.integrations.ignite")
    with pytest.raises(ImportError, match=r'pip install "mrissl\[ignite\]"'):
        importlib.import_module("mrissl.integrations.ignite")


def test_state_dict_round_trips_the_monitor():
    net = _Net()
    monitor = CollapseMonitor(dim=4, window=2, warn=False)
    handler = EffectiveRankHandler(lambda engine: net.latest, monitor=monitor)
    _trainer(net, [handler]).run()
    fresh = CollapseMonitor(dim=4, window=2, warn=False)
    restored = EffectiveRankHandler(lambda engine: net.latest, monitor=fresh)
    restored.load_state_dict(handler.state_dict())
    assert fresh.ranks == monitor.ranks
    assert fresh.steps == monitor.steps == EPOCHS * STEPS
    assert EffectiveRankHandler().state_dict() == {}

"""Optional integrations with training frameworks: Lightning, Ignite (MONAI engines), torchmetrics.

Each submodule imports its framework at import time and is imported on its own, so the
framework is needed only by the code that uses it; nothing else in mrissl imports this
package. Install the frameworks with the extras of the same names, for example
``pip install "mrissl[lightning]"``:

* ``mrissl.integrations.lightning``:
  [`EffectiveRankCallback`][mrissl.integrations.lightning.EffectiveRankCallback], a Lightning
  callback that logs the effective rank and RankMe of chosen features, and a
  ``CollapseMonitor`` verdict, every epoch.
* ``mrissl.integrations.ignite``:
  [`EffectiveRankHandler`][mrissl.integrations.ignite.EffectiveRankHandler], the same for
  Ignite engines, MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator`` included.
* ``mrissl.integrations.torchmetrics``:
  [`EffectiveRank`][mrissl.integrations.torchmetrics.EffectiveRank], the streaming meter as a
  ``torchmetrics.Metric``.
"""

__all__: list[str] = []

"""Random state of our MONAI transforms that is right in any data loader.

MONAI's own ``DataLoader`` reseeds every random transform in every worker (its
``worker_init_fn`` calls ``set_random_state``). A plain ``torch.utils.data.DataLoader`` does
not: each worker starts with a copy of the parent's ``RandomState``, so all workers replay the
same draws, and every epoch (new workers, same parent state) repeats the one before.

``WorkerSeeded`` closes that gap. At its first draw in
a worker whose random state nobody set there, it derives a new state from PyTorch's seed of
that worker (``get_worker_info().seed``, different for every worker and every epoch, and
reproducible under ``torch.manual_seed`` or the loader's ``generator``) mixed with one draw of
the state it inherited (so ``set_random_state`` in the parent still determines the result).
Where MONAI's loader, or a ``worker_init_fn`` of yours, calls ``set_random_state`` inside the
worker, that state is kept; in the main process nothing changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.utils.data
from monai.transforms.transform import Randomizable

__all__ = ["WorkerSeeded", "worker_seed"]


def worker_seed() -> int | None:
    """PyTorch's seed of the current data-loader worker, or ``None`` in the main process."""
    info = torch.utils.data.get_worker_info()
    return None if info is None else int(info.seed)


class WorkerSeeded(Randomizable):
    """A MONAI ``Randomizable`` whose state is reseeded once in each plain loader worker."""

    #: the worker seed the current state belongs to (``None``: the main process's state)
    _state_worker_seed: int | None = None
    #: the seed of this call's ``torch.Generator``, drawn by ``randomize``
    _seed: int = 0

    def randomize(self, data: Any = None) -> None:
        """Draw the seed of this call's ``torch.Generator`` from MONAI's ``RandomState``."""
        self._sync_worker_state()
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> Any:
        """MONAI's ``set_random_state``; the state set here is kept in this worker."""
        super().set_random_state(seed=seed, state=state)
        self._state_worker_seed = worker_seed()
        return self

    def _sync_worker_state(self) -> None:
        """In a worker whose state was inherited, derive this worker's own state once."""
        seed = worker_seed()
        if seed is None or seed == self._state_worker_seed:
            return
        inherited = int(self.R.randint(0, 2**31 - 1))
        entropy = np.random.SeedSequence([seed, inherited]).generate_state(4)
        self.R = np.random.RandomState(entropy)
        self._state_worker_seed = seed

"""The Ray Train side of the drain (drain.py): install its SIGTERM handler on each train worker.

The training function runs in a thread of the worker actor, where Python cannot install signal
handlers; the backend's ``on_training_start`` runs on each actor's main thread, before training
starts. Imported by the driver only (main.py), so importing loop.py does not pull in Ray Train.
"""
from __future__ import annotations

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from . import drain


def install_on_worker() -> bool:
    drain.reset()
    return drain.install()


class _DrainingBackend(_TorchBackend):
    def on_training_start(self, worker_group, backend_config) -> None:
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(install_on_worker)


class DrainingTorchConfig(TorchConfig):
    """TorchConfig whose backend also installs the drain handler on every train worker."""

    @property
    def backend_cls(self):
        return _DrainingBackend

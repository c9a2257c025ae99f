"""SLURM pieces the cluster configs instantiate (``conf/cluster/slurm.yaml``).

Lightning's ``SLURMEnvironment`` takes the requeue signal as a ``signal.Signals``, which YAML cannot
spell; :func:`slurm_environment` takes its name instead (``USR2``, ``SIGUSR2`` or the number).
"""

from __future__ import annotations

import signal

from lightning.pytorch.plugins.environments import SLURMEnvironment


def parse_signal(name: str | int) -> signal.Signals:
    """``"USR2"``, ``"SIGUSR2"``, ``"usr2"`` or ``12`` -> ``signal.SIGUSR2``."""
    if isinstance(name, int):
        try:
            return signal.Signals(name)
        except ValueError:
            raise ValueError(f"{name} is not a signal number on this system; use a name such as USR2") from None
    upper = str(name).strip().upper()
    key = upper if upper.startswith("SIG") else f"SIG{upper}"
    if key not in signal.Signals.__members__:
        raise ValueError(f"unknown signal {name!r}: use a name such as USR2 (SIGUSR2), USR1 or TERM")
    return signal.Signals[key]


def slurm_environment(auto_requeue: bool = True, requeue_signal: str | int = "USR2") -> SLURMEnvironment:
    """Lightning's SLURM cluster environment, with the requeue signal given by name.

    With ``auto_requeue`` Lightning saves an HPC checkpoint and runs ``scontrol requeue`` when the signal
    arrives, unless another handler (submitit's, under the Hydra submitit launcher) already owns it.
    """
    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=parse_signal(requeue_signal))

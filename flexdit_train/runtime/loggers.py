"""Weights & Biases logging that cannot stop training.

On clusters W&B is the usual cause of a hung rank 0: no network on compute nodes, no credentials, a
slow ``wandb.init``. So the mode defaults to ``auto`` (online only with credentials and a reachable
server, else offline, to ``wandb sync`` later), initialisation is bounded by a timeout, and any failure
falls back to a CSV logger with a warning. The run id derives from the run directory, so a requeued
job (same directory) continues the same W&B run.
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def wandb_credentials(env: Mapping[str, str] | None = None) -> str | None:
    """Where W&B would find an API key: ``WANDB_API_KEY``, or the netrc file (``$NETRC``, else ~/.netrc,
    which ``wandb login`` writes) with an entry for the W&B host (``WANDB_BASE_URL``); None without one."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(env.get("NETRC") or Path.home() / ".netrc")
    try:
        return str(path) if path.is_file() and netrc.netrc(path).authenticators(host) else None
    except (OSError, netrc.NetrcParseError):
        return None


def wandb_reachable(timeout: float = 2.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(mode: str) -> str:
    """``auto`` -> online with credentials and a reachable server, else offline; WANDB_MODE wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    return "online" if wandb_credentials() and wandb_reachable() else "offline"


def run_id_for(save_dir: str | Path) -> str:
    """A W&B run id stable for one run directory (requeues continue the same W&B run)."""
    return hashlib.sha1(str(Path(save_dir).resolve()).encode()).hexdigest()[:16]


def wandb_logger(
    project: str,
    save_dir: str,
    name: str | None = None,
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    mode: str = "auto",
    init_timeout_s: float = 90.0,
) -> Logger:
    """A WandbLogger initialised eagerly on rank 0 within ``init_timeout_s``; a CSVLogger if that fails."""
    import wandb

    resolved = resolve_mode(mode)
    try:
        logger = WandbLogger(
            project=project,
            save_dir=save_dir,
            name=name,
            entity=entity,
            group=group,
            tags=list(tags or []),
            id=run_id_for(save_dir),
            resume="allow",
            mode=resolved,
            settings=wandb.Settings(init_timeout=init_timeout_s),
        )
        if rank_zero_only.rank == 0:
            logger.experiment  # noqa: B018 - initialise now, inside the try, not mid-training
        return logger
    except Exception as err:  # W&B must never be fatal
        log.warning("W&B logging disabled (%s: %s); writing CSV metrics to %s instead", type(err).__name__, err, save_dir)
        return CSVLogger(save_dir=save_dir, name="csv", version="")


def finish_wandb() -> None:
    """Close the W&B run so the next job of a Hydra multirun starts its own."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()

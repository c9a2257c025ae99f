"""Analytic compute: one cost model per arch (its MAC terms), and the ``python -m flexdit_train.flops`` app.

:mod:`.terms` holds the MAC terms of one forward (image and video DiT, text DiT, EDT, SparseDiT), :mod:`.cost` the
:class:`CostModel` that sums them for a model at a latent shape and patch size; ``__main__`` is the CLI.
"""

from flexdit_train.flops.cost import CostModel, cost_model, registry_arch, registry_config
from flexdit_train.flops.terms import DIT_TERMS, EDT_TERMS, SPARSE_DIT_TERMS, TEXT_TERMS, ForwardShape, Term

__all__ = [
    "DIT_TERMS",
    "EDT_TERMS",
    "SPARSE_DIT_TERMS",
    "TEXT_TERMS",
    "CostModel",
    "ForwardShape",
    "Term",
    "cost_model",
    "registry_arch",
    "registry_config",
]

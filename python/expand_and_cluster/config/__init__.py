"""Every setting of a recovery, as frozen, validated dataclasses, and one vocabulary of dotted
keys for them.

:class:`RecoverConfig` holds the top-level settings and one nested config per step of the
method: ``train`` (:class:`TrainConfig`), ``search`` (:class:`ExpansionSearchConfig`),
``cluster`` (:class:`ClusterConfig`) and ``repair`` (:class:`RepairConfig`). A setting is named
by its dotted key, ``"<field>"`` or ``"<nested>.<field>"`` (``train.max_epochs``,
``cluster.gamma``, ``repair.trial_queries``, ``held_out_fraction``): the command line's flags,
its ``--set KEY=VALUE``, the suites' ``settings`` and :meth:`RecoverConfig.updated` all speak
these keys. Invalid values raise :class:`~expand_and_cluster.errors.InputError` (a ValueError)
naming the key.
"""

from .recover import RUN_DEFAULTS, RecoverConfig, parse_assignments, parse_setting
from .steps import (
    CUT_RULES,
    DTYPES,
    LINKAGE_BACKENDS,
    METRICS,
    UPPER_STUDENTS,
    ClusterConfig,
    ExpansionSearchConfig,
    RepairConfig,
    TrainConfig,
)

__all__ = [
    "CUT_RULES",
    "DTYPES",
    "LINKAGE_BACKENDS",
    "METRICS",
    "RUN_DEFAULTS",
    "UPPER_STUDENTS",
    "ClusterConfig",
    "ExpansionSearchConfig",
    "RecoverConfig",
    "RepairConfig",
    "TrainConfig",
    "parse_assignments",
    "parse_setting",
]

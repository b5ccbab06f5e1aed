"""provisioner: an outbound SCIM 2.0 provisioning engine.

The names below are imported on first use (PEP 562), not with the package: ``provisioner --help``
and every module of the package import ``provisioner`` first, and must not pay for the engine
(SQLAlchemy, the mapping language, the SCIM client) before a command needs it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from provisioner.config import Config, load_config
    from provisioner.errors import ConfigError, SafetyStop, SourceError, UserError
    from provisioner.lifecycle import Reason
    from provisioner.mapping import AttributeMapping, MappingError, load_mapping
    from provisioner.planner import Decision, Desired, Kind, Link, Plan, decide, plan_target
    from provisioner.store import open_store
    from provisioner.sync import TargetReport, sync_target

# Each public name and the module that defines it.
_HOMES = {
    "AttributeMapping": "provisioner.mapping",
    "Config": "provisioner.config",
    "ConfigError": "provisioner.errors",
    "Decision": "provisioner.planner",
    "Desired": "provisioner.planner",
    "Kind": "provisioner.planner",
    "Link": "provisioner.planner",
    "MappingError": "provisioner.mapping",
    "Plan": "provisioner.planner",
    "Reason": "provisioner.lifecycle",
    "SafetyStop": "provisioner.errors",
    "SourceError": "provisioner.errors",
    "TargetReport": "provisioner.sync",
    "UserError": "provisioner.errors",
    "decide": "provisioner.planner",
    "load_config": "provisioner.config",
    "load_mapping": "provisioner.mapping",
    "open_store": "provisioner.store",
    "plan_target": "provisioner.planner",
    "sync_target": "provisioner.sync",
}

__all__ = [
    "AttributeMapping",
    "Config",
    "ConfigError",
    "Decision",
    "Desired",
    "Kind",
    "Link",
    "MappingError",
    "Plan",
    "Reason",
    "SafetyStop",
    "SourceError",
    "TargetReport",
    "UserError",
    "decide",
    "load_config",
    "load_mapping",
    "open_store",
    "plan_target",
    "sync_target",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        # Not a public name: a submodule (`from provisioner import queue`) is then imported as usual.
        raise AttributeError(f"module 'provisioner' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

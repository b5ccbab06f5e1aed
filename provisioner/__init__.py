"""provisioner: an outbound SCIM 2.0 provisioning engine."""

from provisioner.config import Config, load_config
from provisioner.errors import ConfigError, SafetyStop, SourceError, UserError
from provisioner.mapping import AttributeMapping, MappingError, load_mapping
from provisioner.planner import Decision, Desired, Kind, Link, Plan, Reason, decide, plan_target
from provisioner.store import open_store
from provisioner.sync import TargetReport, sync_target

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

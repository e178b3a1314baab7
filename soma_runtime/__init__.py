"""Soma Runtime's shared core: the organ contract, capability cards and the executive."""

from soma_runtime.cards import (
    FunctionCard,
    OrganCard,
    ResidencyPolicy,
    SloConfig,
    SubOrganCard,
    schema_of,
)
from soma_runtime.contract import ErrorKind, Response, Stimulus
from soma_runtime.executive import (
    Executive,
    InvalidStimulus,
    PathwayStep,
    UnknownFunction,
    UnknownOrgan,
)
from soma_runtime.organ import Organ, OrganEnvironment, OrganFailure, RoutedOrgan, function

__version__ = "0.1.0"

__all__ = [
    "ErrorKind",
    "Executive",
    "FunctionCard",
    "InvalidStimulus",
    "Organ",
    "OrganCard",
    "OrganEnvironment",
    "OrganFailure",
    "PathwayStep",
    "ResidencyPolicy",
    "Response",
    "RoutedOrgan",
    "SloConfig",
    "Stimulus",
    "SubOrganCard",
    "UnknownFunction",
    "UnknownOrgan",
    "function",
    "schema_of",
]

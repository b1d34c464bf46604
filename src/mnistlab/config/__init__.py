"""The config: the schema Hydra composes against (:mod:`.schema`), the checks it cannot
express (:mod:`.validate`) and compose errors as one line (:mod:`.messages`). It imports
nothing of the project but :mod:`mnistlab.core`."""

from mnistlab.config.messages import compose_message, hydra_error_line
from mnistlab.config.schema import (
    CONF_DIR,
    OBJECTIVES,
    Config,
    DatasetConfig,
    ModelConfig,
    RegularizerConfig,
    SchedulerConfig,
    register,
)
from mnistlab.config.validate import (
    COUNT,
    DIRECTIONS,
    check_choice,
    check_number,
    check_objective,
    validate,
)

__all__ = [
    "CONF_DIR",
    "COUNT",
    "DIRECTIONS",
    "OBJECTIVES",
    "Config",
    "DatasetConfig",
    "ModelConfig",
    "RegularizerConfig",
    "SchedulerConfig",
    "check_choice",
    "check_number",
    "check_objective",
    "compose_message",
    "hydra_error_line",
    "register",
    "validate",
]

"""Every configuration schema, in one neutral place that every layer may import.

``turnout.config.model`` (the LM, MoE, MoD), ``.parallel`` (expert parallelism, ZeRO),
``.train`` (data, optimisation, tracking), ``.root`` (``TurnoutConfig``: all sections and
the cross-section checks) and ``.load`` (presets, YAML files, ``a.b=c`` overrides).
Nothing here imports torch or any turnout layer.
"""

from turnout.config.model import MoDConfig, ModelConfig, MoEConfig
from turnout.config.parallel import ParallelConfig
from turnout.config.root import LaunchConfig, TurnoutConfig
from turnout.config.train import DataConfig, TrackingConfig, TrainConfig

__all__ = [
    "DataConfig",
    "LaunchConfig",
    "MoDConfig",
    "MoEConfig",
    "ModelConfig",
    "ParallelConfig",
    "TrackingConfig",
    "TrainConfig",
    "TurnoutConfig",
]

"""headstart: transfer learning on image folders, offline and fast on a CPU."""

__version__ = "0.1.0"

from headstart.backbones import (  # noqa: E402
    BackboneConfig,
    create_backbone,
    list_backbones,
)
from headstart.errors import (  # noqa: E402
    ConfigError,
    DataError,
    FrozenTensorChanged,
    HeadstartError,
    TrainingDiverged,
    WeightsError,
)
from headstart.evaluate import evaluate  # noqa: E402
from headstart.heads import HeadSpec  # noqa: E402
from headstart.predict import Prediction, Predictor, load  # noqa: E402
from headstart.train import TrainConfig, TrainResult, train  # noqa: E402

__all__ = [
    "BackboneConfig",
    "ConfigError",
    "DataError",
    "FrozenTensorChanged",
    "HeadSpec",
    "HeadstartError",
    "Prediction",
    "Predictor",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "WeightsError",
    "create_backbone",
    "evaluate",
    "list_backbones",
    "load",
    "train",
]

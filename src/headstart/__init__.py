"""headstart: transfer learning on image folders, offline and fast on a CPU.

Layers, each importing only those above it in this list:
  core       errors, logging, devices, processes, files, digests, metrics, option declarations
  data       dataset layout (the one scanner), images, transforms, loaders, doctor
  models     backbones and their weight sources, heads, freezing, the transfer model, stored format
  features   feature extraction, the feature cache, cached prefix maps
  inference  a stored model run on images: predictions and logits (PyTorch or ONNX Runtime)
  training   options, run setup, the loop, checkpoints, strategy plug-ins, the run record
  insight    evaluation, calibration, report, compare, summary, bench
  deploy     export, batch prediction, Ray, the HTTP service (public path: headstart.serve)
  cli        the command line, over the API below
"""

__version__ = "0.1.0"

from headstart.core.errors import (  # noqa: E402
    ConfigError,
    DataError,
    FrozenTensorChanged,
    HeadstartError,
    TrainingDiverged,
    WeightsError,
)
from headstart.core.logs import configure as configure_logging  # noqa: E402
from headstart.inference.predictor import Prediction, Predictor, load  # noqa: E402
from headstart.insight.calibrate import calibrate  # noqa: E402
from headstart.insight.compare import compare  # noqa: E402
from headstart.insight.evaluate import evaluate  # noqa: E402
from headstart.models.backbones import create_backbone, list_backbones  # noqa: E402
from headstart.models.config import BackboneConfig  # noqa: E402
from headstart.models.heads import HeadSpec  # noqa: E402
from headstart.training.options import TrainConfig  # noqa: E402
from headstart.training.record import RunResults, TrainResult  # noqa: E402
from headstart.training.run import resume, train  # noqa: E402

__all__ = [
    "BackboneConfig",
    "ConfigError",
    "DataError",
    "FrozenTensorChanged",
    "HeadSpec",
    "HeadstartError",
    "Prediction",
    "Predictor",
    "RunResults",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "WeightsError",
    "calibrate",
    "compare",
    "configure_logging",
    "create_backbone",
    "evaluate",
    "list_backbones",
    "load",
    "resume",
    "train",
]

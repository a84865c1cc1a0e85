"""advsentry's science: feature responses, average local spatial entropy, the detector.

Public API::

    from detector import ScoreConfig, average_local_spatial_entropy, guided_feature_response, Detector
"""

from .calibration import CalibrationArtifact, CalibrationError
from .combiner import LogisticCombiner, SingleMap
from .config import NAMED_CONFIGS, PAPER_CONFIG, ConfigError, ScoreConfig
from .detector import (
    DEFAULT_ARTIFACT_PATH,
    DEFAULT_COMBINER,
    DEFAULT_FEATURES,
    FEATURE_RESPONSE,
    GENERIC_FEATURES,
    Detector,
    entropy_output_name,
    map_entropies,
)
from .entropy import average_local_spatial_entropy, gray_levels, local_entropy_map
from .guided import FeatureResponse, UnsupportedModelError, guided_backprop, guided_feature_response, guided_responses
from .models import ModelIdentity

__all__ = [
    "CalibrationArtifact",
    "CalibrationError",
    "ConfigError",
    "DEFAULT_ARTIFACT_PATH",
    "DEFAULT_COMBINER",
    "DEFAULT_FEATURES",
    "Detector",
    "FEATURE_RESPONSE",
    "GENERIC_FEATURES",
    "FeatureResponse",
    "LogisticCombiner",
    "ModelIdentity",
    "NAMED_CONFIGS",
    "PAPER_CONFIG",
    "ScoreConfig",
    "SingleMap",
    "UnsupportedModelError",
    "average_local_spatial_entropy",
    "entropy_output_name",
    "map_entropies",
    "gray_levels",
    "guided_backprop",
    "guided_feature_response",
    "guided_responses",
    "local_entropy_map",
]

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "datatype", "shape", "raw_contents")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    RAW_CONTENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    raw_contents: bytes
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., raw_contents: _Optional[bytes] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("id", "model_name", "model_version", "feature_maps", "inputs")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_MAPS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model_name: str
    model_version: str
    feature_maps: _containers.RepeatedCompositeFieldContainer[Tensor]
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., feature_maps: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("score", "adversarial")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ADVERSARIAL_FIELD_NUMBER: _ClassVar[int]
    score: float
    adversarial: bool
    def __init__(self, score: _Optional[float] = ..., adversarial: _Optional[bool] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("id", "model_name", "verdicts", "threshold", "calibration_id", "error_message", "error_code")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    model_name: str
    verdicts: _containers.RepeatedCompositeFieldContainer[Verdict]
    threshold: float
    calibration_id: str
    error_message: str
    error_code: str
    def __init__(self, id: _Optional[str] = ..., model_name: _Optional[str] = ..., verdicts: _Optional[_Iterable[_Union[Verdict, _Mapping]]] = ..., threshold: _Optional[float] = ..., calibration_id: _Optional[str] = ..., error_message: _Optional[str] = ..., error_code: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("model_name", "feature_outputs", "calibration_id", "threshold", "calibration_source", "score_config_json", "policy", "traffic_count", "traffic_implied_fpr", "target_fpr", "traffic_first_seen", "traffic_last_seen")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FEATURE_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_ID_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_IMPLIED_FPR_FIELD_NUMBER: _ClassVar[int]
    TARGET_FPR_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    feature_outputs: _containers.RepeatedScalarFieldContainer[str]
    calibration_id: str
    threshold: float
    calibration_source: str
    score_config_json: str
    policy: str
    traffic_count: int
    traffic_implied_fpr: float
    target_fpr: float
    traffic_first_seen: float
    traffic_last_seen: float
    def __init__(self, model_name: _Optional[str] = ..., feature_outputs: _Optional[_Iterable[str]] = ..., calibration_id: _Optional[str] = ..., threshold: _Optional[float] = ..., calibration_source: _Optional[str] = ..., score_config_json: _Optional[str] = ..., policy: _Optional[str] = ..., traffic_count: _Optional[int] = ..., traffic_implied_fpr: _Optional[float] = ..., target_fpr: _Optional[float] = ..., traffic_first_seen: _Optional[float] = ..., traffic_last_seen: _Optional[float] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("upstream", "upstream_ready", "default_policy", "scoring_failure", "models", "counters", "max_batch_size", "max_batch_delay_ms")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_READY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POLICY_FIELD_NUMBER: _ClassVar[int]
    SCORING_FAILURE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    upstream: str
    upstream_ready: bool
    default_policy: str
    scoring_failure: str
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    counters: _containers.ScalarMap[str, float]
    max_batch_size: int
    max_batch_delay_ms: float
    def __init__(self, upstream: _Optional[str] = ..., upstream_ready: _Optional[bool] = ..., default_policy: _Optional[str] = ..., scoring_failure: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., counters: _Optional[_Mapping[str, float]] = ..., max_batch_size: _Optional[int] = ..., max_batch_delay_ms: _Optional[float] = ...) -> None: ...

class GetTrafficStateRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class GetTrafficStateResponse(_message.Message):
    __slots__ = ("state_json",)
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    state_json: bytes
    def __init__(self, state_json: _Optional[bytes] = ...) -> None: ...

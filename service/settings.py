"""All sidecar settings in one object: defaults < YAML file < ``ADVSENTRY_*`` env < flags.

``advsentry serve`` builds one :class:`Settings` and hands it to every part
(server, batcher, metrics, tracing), so a value is read in one place and
documented in one place (the field descriptions double as ``--help`` text).
Nested values use ``__`` in environment variables, e.g.
``ADVSENTRY_MODELS='{"resnet": {"feature_outputs": ["feature_response"]}}'``
or a ``models:`` mapping in the YAML file.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

DEFAULT_MODEL_NAME = "efficientnet-lite0"


class Policy(str, Enum):
    """What the sidecar does with a scored request."""

    annotate = "annotate"  # forward, add advsentry_* response parameters
    reject = "reject"  # flagged inputs get PERMISSION_DENIED, no model output
    shadow = "shadow"  # metrics only, response byte-identical to Triton's


class ScoringFailure(str, Enum):
    """What happens to a request whose feature response could not be scored.

    ``open``: forward the model output with ``advsentry_error`` set (availability
    first: a detector fault does not become an outage). ``closed``: answer
    INTERNAL and withhold the output (security first; use it with ``reject``).
    """

    open = "open"
    closed = "closed"


class EntropyIn(str, Enum):
    """Where the per-map entropies of a protected model are computed.

    ``auto``: inside Triton when the model serves the entropy output that
    matches the detector's calibration (``advsentry export-model`` models do);
    the sidecar then only combines a few floats per image, with no tensor code
    or micro-batching on the request path. Otherwise in the sidecar, from the
    maps. ``sidecar``: always fetch the maps and compute here (e.g. to use a
    GPU on the sidecar's side).
    """

    auto = "auto"
    sidecar = "sidecar"


class ModelProtection(BaseModel):
    """Per-model configuration: which outputs carry the feature maps, which policy and calibration."""

    feature_outputs: tuple[str, ...] | None = Field(
        default=None, description="Triton outputs holding the feature maps; default: the detector's maps."
    )
    policy: Policy | None = Field(default=None, description="Overrides the global policy for this model.")
    calibration: Path | None = Field(default=None, description="Calibration artifact for this model.")


class Settings(BaseSettings):
    """advsentry sidecar settings (flags > ADVSENTRY_* env > YAML file > defaults)."""

    model_config = SettingsConfigDict(env_prefix="ADVSENTRY_", env_nested_delimiter="__", extra="forbid")

    host: str = Field(default="0.0.0.0", description="Address the gRPC listener binds.")
    port: int = Field(default=8001, ge=0, le=65535, description="gRPC listener port (KServe-v2 + advsentry API).")
    metrics_port: int = Field(default=8002, ge=0, le=65535, description="Prometheus /metrics HTTP port (0: off).")
    metrics_host: str = Field(default="0.0.0.0", description="Address the metrics HTTP server binds.")
    upstream: str | None = Field(
        default=None, description="Triton gRPC HOST:PORT to front; unset: start an embedded Triton."
    )
    calibration: Path | None = Field(default=None, description="Calibration artifact (JSON) for protected models.")
    calibration_poll_s: float = Field(
        default=2.0, gt=0, description="How often the calibration file is checked for changes (hot reload)."
    )
    policy: Policy = Field(default=Policy.annotate, description="annotate | reject | shadow.")
    scoring_failure: ScoringFailure = Field(
        default=ScoringFailure.open, description="open (forward, flag the error) | closed (INTERNAL)."
    )
    models: dict[str, ModelProtection] = Field(
        default_factory=dict, description="Protected models and their per-model settings."
    )
    protect_all: bool = Field(
        default=True,
        description="Also protect every upstream model whose outputs include the detector's feature maps "
        "or its entropy output.",
    )
    max_batch_size: int = Field(default=16, ge=1, description="Most images scored in one detector call.")
    max_batch_delay_ms: float = Field(
        default=2.0, ge=0, description="Longest wait for more requests before a partial batch is scored."
    )
    entropy_in: EntropyIn = Field(
        default=EntropyIn.auto,
        description="auto (in Triton when the model serves the matching entropy output) | sidecar (always here).",
    )
    device: str = Field(default="cpu", description="torch device for scoring (cpu, cuda, cuda:1).")
    upstream_timeout_s: float = Field(default=30.0, gt=0, description="Deadline for one upstream call.")
    max_message_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent."
    )
    shutdown_grace_s: float = Field(default=10.0, ge=0, description="Time in-flight calls get to finish on stop.")
    health_poll_s: float = Field(default=2.0, gt=0, description="Upstream readiness poll interval.")
    embedded_model_repository: Path | None = Field(
        default=None, description="Model repository for the embedded Triton; default: export the bundled model."
    )
    embedded_max_batch_size: int = Field(default=8, ge=1, description="max_batch_size of the embedded model.")
    log_level: str = Field(default="INFO", description="Python log level.")
    config_file: Path | None = Field(default=None, description="YAML settings file (ADVSENTRY_CONFIG_FILE).")

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"upstream must be HOST:PORT, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_reject_needs_threshold(self) -> "Settings":
        policies = {self.policy} | {m.policy for m in self.models.values() if m.policy}
        if Policy.reject in policies and self.calibration is None and not any(
            m.calibration for m in self.models.values()
        ):
            raise ValueError("policy 'reject' needs a calibration artifact (--calibration) for its threshold")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlFromSetting(settings_cls, init_settings, env_settings)

    def protection_for(self, model_name: str) -> ModelProtection | None:
        """The explicit per-model configuration, if any."""
        return self.models.get(model_name)

    def policy_for(self, model_name: str) -> Policy:
        protection = self.models.get(model_name)
        return protection.policy if protection and protection.policy else self.policy


class _YamlFromSetting(PydanticBaseSettingsSource):
    """Reads the YAML file named by the ``config_file`` flag or ``ADVSENTRY_CONFIG_FILE``."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
    ) -> None:
        super().__init__(settings_cls)
        self._init = init_settings
        self._env = env_settings

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self._init().get("config_file") or self._env().get("config_file")
        if not path:
            return {}
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"settings file {path} does not exist")
        data = YamlConfigSettingsSource(self.settings_cls, yaml_file=path)()
        return {key.replace("-", "_"): value for key, value in data.items()}


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from flags (``overrides``; ``None`` = not given), env and the YAML file."""
    given = {key: value for key, value in overrides.items() if value is not None}
    if config_file is not None:
        given["config_file"] = config_file
    return Settings(**given)

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
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator
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
    first: a detector fault does not become an outage). ``closed``: refuse the
    request and withhold the output (security first; the default under
    ``reject``, see :meth:`Settings.scoring_failure_for`). Either way the request
    is counted in ``advsentry_unscored_requests_total`` and logged.
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


class Disclosure(str, Enum):  # --- disclosure & load shedding (issue 13) ---
    """What an annotated response (and a rejection) tells the client.

    ``none``: no ``advsentry_*`` parameters at all (``reject`` still rejects);
    ``verdict``: booleans only (``advsentry_adversarial``, ``advsentry_invalid_input``,
    hooks' flags) and the non-numeric ``advsentry_error``/``advsentry_calibration``;
    ``score``: also the scores and the threshold. Trusted callers
    (``trusted_clients``, ``trusted_metadata``) always get ``score``. A score is an
    oracle an attacker can minimize query by query; the full detail stays in
    metrics, traces and logs.
    """

    none = "none"
    verdict = "verdict"
    score = "score"


class ProbingPolicy(str, Enum):  # --- probing (issue 12) ---
    """What the sidecar does when a client's queries look like a black-box attack (service/hooks/probing.py)."""

    off = "off"
    shadow = "shadow"  # metrics only
    annotate = "annotate"  # response parameter advsentry_probing
    reject = "reject"  # PERMISSION_DENIED for probing_cooldown_s


def _shipped_or_path(value: Any) -> Any:
    """A shipped detector's name (``default``, ``fixed-signals``, ``entropy-9photo``, ``paper``) → its location; else the path.

    The one resolver (:func:`detector.detector.artifact_location`): an existing
    file of that name wins; ``paper`` (no artifact) stays ``paper``. The
    detector package (torch) is imported only for a name to resolve.
    """
    if isinstance(value, (str, Path)) and str(value) and "/" not in str(value) and not Path(value).exists():
        from detector.detector import artifact_location

        return artifact_location(value)
    return value


#: A calibration artifact's path, or a shipped detector's name (see :func:`_shipped_or_path`).
CalibrationPath = Annotated[Path, BeforeValidator(_shipped_or_path)]


class ModelProtection(BaseModel):
    """Per-model configuration: which outputs carry the feature maps, which policy and calibration."""

    feature_outputs: tuple[str, ...] | None = Field(
        default=None, description="Triton outputs holding the feature maps; default: the detector's maps."
    )
    policy: Policy | None = Field(default=None, description="Overrides the global policy for this model.")
    calibration: CalibrationPath | None = Field(default=None, description="Calibration artifact for this model, or a "
                                                "shipped detector's name.")
    disclosure: Disclosure | None = Field(  # issue 13
        default=None, description="Overrides the global disclosure for this model."
    )


class ListenerSettings(BaseModel):
    """Where the sidecar listens and how its gRPC server behaves."""

    host: str = Field(default="0.0.0.0", description="Address the gRPC listener binds.")
    port: int = Field(default=8001, ge=0, le=65535, description="gRPC listener port (KServe-v2 + advsentry API).")
    metrics_port: int = Field(default=8002, ge=0, le=65535, description="Prometheus /metrics HTTP port (0: off).")
    metrics_host: str = Field(default="0.0.0.0", description="Address the metrics HTTP server binds.")
    max_message_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent."
    )
    shutdown_grace_s: float = Field(default=10.0, ge=0, description="Time in-flight calls get to finish on stop.")
    stream_max_in_flight: int = Field(
        default=32, ge=1, description="Messages of one ModelStreamInfer/DetectStream stream in progress at once; the "
        "next message is read only when one finishes, so a cancelled stream leaves at most this many to drop.",
    )
    log_level: str = Field(default="INFO", description="Python log level.")


class UpstreamSettings(BaseModel):
    """The Triton the sidecar fronts (or the embedded one it starts), and what it is sent."""

    upstream: str | None = Field(
        default=None, description="Triton gRPC HOST:PORT to front; unset: start an embedded Triton."
    )
    upstream_timeout_s: float = Field(default=30.0, gt=0, description="Deadline for one upstream call.")
    health_poll_s: float = Field(default=2.0, gt=0, description="Upstream readiness poll interval.")
    embedded_model_repository: Path | None = Field(
        default=None, description="Model repository for the embedded Triton; default: export the bundled model."
    )
    embedded_max_batch_size: int = Field(default=8, ge=1, description="max_batch_size of the embedded model.")
    strip_metadata: list[str] = Field(
        default_factory=list, description="gRPC metadata keys never forwarded upstream (internal headers); the "
        "trusted_metadata keys are always stripped too.",
    )


class DetectionSettings(BaseModel):
    """Which models are protected, by which calibration and policy, and how scoring runs."""

    calibration: CalibrationPath | None = Field(default=None, description="Calibration artifact (JSON) for protected models, "
                                     "or a shipped detector's name (default, fixed-signals, entropy-9photo): with the "
                                     "embedded Triton, the model serves that detector's signals.")
    calibration_poll_s: float = Field(
        default=2.0, gt=0, description="How often the calibration file is checked for changes (hot reload)."
    )
    policy: Policy = Field(default=Policy.annotate, description="annotate | reject | shadow.")
    scoring_failure: ScoringFailure | None = Field(
        default=None, description="A protected request without a verdict: open (forward, advsentry_error set) | "
        "closed (refused). Unset: closed for models under policy reject, open otherwise.",
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


class TlsSettings(BaseModel):
    """TLS on the listener (and mTLS) and towards the upstream (issue 13)."""

    tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate (chain) of the gRPC listener; set: TLS on, plaintext refused."
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        default=None, description="PEM CA bundle that client certificates must chain to (mTLS); "
        "needs tls_require_client_cert.",
    )
    tls_require_client_cert: bool = Field(
        default=False, description="mTLS: refuse clients without a certificate from tls_client_ca_file."
    )
    upstream_tls: bool = Field(default=False, description="Connect to the upstream Triton over TLS.")
    upstream_ca_file: Path | None = Field(
        default=None, description="PEM CA bundle that verifies the upstream's certificate (unset: system roots)."
    )
    upstream_cert_file: Path | None = Field(
        default=None, description="PEM client certificate presented to the upstream (mTLS to Triton)."
    )
    upstream_key_file: Path | None = Field(default=None, description="PEM private key of upstream_cert_file.")
    upstream_server_name: str | None = Field(
        default=None, description="Name expected in the upstream's certificate when it differs from the host."
    )
    tls_reload_interval_s: float = Field(
        default=5.0, gt=0, description="How often changed TLS files are looked for (hot reload, both sides)."
    )


class DisclosureSettings(BaseModel):
    """Who the caller is and what it may learn (issue 13)."""

    client_id_metadata_key: str | None = Field(
        default=None,
        description="gRPC metadata key naming the client (e.g. x-client-id) when no mTLS subject is present; "
        "only trust it behind a gateway that sets it. Unset: the peer address identifies the client.",
    )
    disclosure: Disclosure = Field(
        default=Disclosure.verdict,
        description="What clients learn: none (no advsentry_* parameters) | verdict (flags only) | "
        "score (scores and threshold too). Trusted clients always get score.",
    )
    trusted_clients: list[str] = Field(
        default_factory=list,
        description="Client identity keys that get score disclosure: mtls:<subject>, metadata:<value> "
        "(with client_id_metadata_key), peer:<host>.",
    )
    trusted_metadata: list[str] = Field(
        default_factory=list,
        description="KEY=VALUE gRPC metadata pairs (a shared secret header) that make a caller trusted; "
        "compared in constant time.",
    )
    detector_api: bool = Field(
        default=True,
        description="Serve advsentry.v1.DetectorService (Detect returns scores: with disclosure other than "
        "score only trusted callers may call it).",
    )


class SheddingSettings(BaseModel):
    """Load shedding (service/hooks/shedding.py)."""

    max_in_flight: int = Field(
        default=256, ge=0, description="Most intercepted requests in progress per process; beyond it "
        "RESOURCE_EXHAUSTED at once (0: no limit).",
    )
    max_in_flight_per_client: int = Field(
        default=64, ge=0, description="Most intercepted requests in progress per client identity (0: no limit).",
    )


class CaptureSettings(BaseModel):
    """The ring of flagged requests (service/hooks/capture.py, issue 14)."""

    capture_dir: Path | None = Field(
        default=None,
        description="Keep flagged requests (input tensors, scores, signals, request id) in this directory "
        "for `advsentry explain --capture`; unset: off. Captured inputs are user data (see docs/security.md).",
    )
    capture_max_items: int = Field(default=1000, ge=1, description="Most requests the capture ring keeps.")
    capture_max_bytes: int = Field(
        default=1 << 30, ge=1024, description="Most bytes the capture ring keeps on disk (oldest evicted first)."
    )
    capture_sample_rate: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Share of flagged requests the capture ring keeps."
    )
    capture_max_age_s: float | None = Field(
        default=7 * 24 * 3600.0, gt=0, description="Captured requests older than this are deleted (retention)."
    )
    capture_queue_size: int = Field(
        default=64, ge=1, description="Flagged requests waiting for the capture writer; beyond it they are "
        "dropped (advsentry_capture_dropped_total), never waited for.",
    )


class ProbingSettings(BaseModel):
    """Per-client probing detection (service/hooks/probing.py, issue 12)."""

    probing_policy: ProbingPolicy = Field(
        default=ProbingPolicy.shadow,
        description="Stateful probing detection per client: off | shadow (metrics only) | annotate "
        "(response parameter advsentry_probing) | reject (PERMISSION_DENIED during a cool-down). Needs a model "
        "that serves advsentry_embedding (advsentry export-model).",
    )
    probing_threshold: float = Field(
        default=0.42, gt=0, description="Flag a client when a query's mean distance to its k nearest previous "
        "queries (unit embeddings, 0..2) falls below this; chosen on the corpus dev part (benchmarks/probing.py).",
    )
    probing_k: int = Field(default=8, ge=1, description="Neighbours averaged (fewer while the history is shorter).")
    probing_min_queries: int = Field(
        default=3, ge=1, description="Previous queries a client needs before it can be flagged."
    )
    probing_history: int = Field(default=100, ge=1, description="Embeddings kept per client (ring).")
    probing_max_clients: int = Field(
        default=1024, ge=1, description="Clients whose history is kept (least recently seen evicted first).",
    )
    probing_cooldown_s: float = Field(
        default=300.0, ge=0, description="How long a flagged client stays flagged (annotate) or refused (reject).",
    )
    probing_allow_clients: list[str] = Field(
        default_factory=list, description="Client identity keys never flagged (benign bursty clients, e.g. video "
        "frames): mtls:<subject>, metadata:<value>, peer:<host>.",
    )


class TrafficSettings(BaseModel):
    """Traffic score sketches (service/hooks/traffic.py, issue 12)."""

    traffic_sketch: bool = Field(
        default=True, description="Keep a quantile sketch (DDSketch) of scores per model and calibration, in every "
        "policy: GetStatus and advsentry_traffic_implied_fpr report the share of traffic above the threshold; "
        "`advsentry calibrate traffic` derives a threshold from it.",
    )
    traffic_state_path: Path | None = Field(
        default=None, description="File the traffic sketches persist to (atomic writes; read back at start). "
        "Unset: kept in memory only, lost on restart.",
    )
    traffic_flush_s: float = Field(
        default=60.0, gt=0, description="How often the traffic state is written and its metrics updated "
        "(and on stop).",
    )
    traffic_window_s: float = Field(default=3600.0, gt=0, description="Traffic sketch window (one sketch per window).")
    traffic_max_windows: int = Field(
        default=168, ge=1, description="Windows kept; older ones are dropped (retention = window × this; "
        "default one week of hourly windows).",
    )
    traffic_relative_accuracy: float = Field(
        default=0.005, gt=0, lt=1, description="DDSketch relative accuracy: every quantile within this fraction "
        "of the exact value (sketches of different accuracies do not merge).",
    )


class Settings(ListenerSettings, UpstreamSettings, DetectionSettings, TlsSettings, DisclosureSettings,
               SheddingSettings, CaptureSettings, ProbingSettings, TrafficSettings, BaseSettings):
    """advsentry sidecar settings (flags > ADVSENTRY_* env > YAML file > defaults).

    One flat namespace of keys (``port``, ``probing_k``: the same in flags, env
    and the YAML file) whose fields are declared by feature in the classes
    above, so each part's settings read together and a part can be typed
    against its own group (e.g. the probing hook against
    :class:`ProbingSettings`).
    """

    model_config = SettingsConfigDict(env_prefix="ADVSENTRY_", env_nested_delimiter="__", extra="forbid")

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
        # ``paper`` (the seed's single-map detector) has no threshold: under reject nothing would be refused
        rejecting = [None] if self.policy is Policy.reject else []
        rejecting += [name for name, m in self.models.items() if self.policy_for(name) is Policy.reject]
        for name in rejecting:
            protection = self.models.get(name) if name else None
            calibration = protection.calibration if protection and protection.calibration else self.calibration
            if calibration is not None and str(calibration) == "paper":
                where = f"model {name!r}" if name else "the global policy"
                raise ValueError(f"policy 'reject' ({where}) needs a threshold: the 'paper' detector has none; "
                                 "use a calibration artifact or a calibrated shipped detector (default)")
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> "Settings":  # TLS (issue 13)
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("TLS on the listener needs both tls_cert_file and tls_key_file")
        if (self.tls_client_ca_file or self.tls_require_client_cert) and not self.tls_cert_file:
            raise ValueError("client certificates (tls_client_ca_file, tls_require_client_cert) need TLS: "
                             "set tls_cert_file and tls_key_file")
        if self.tls_require_client_cert and not self.tls_client_ca_file:
            raise ValueError("tls_require_client_cert needs tls_client_ca_file (the CA client certificates chain to)")
        if self.tls_client_ca_file and not self.tls_require_client_cert:
            raise ValueError("tls_client_ca_file is only used with tls_require_client_cert=true "
                             "(gRPC does not request optional client certificates)")
        upstream_files = {"upstream_ca_file": self.upstream_ca_file, "upstream_cert_file": self.upstream_cert_file,
                          "upstream_key_file": self.upstream_key_file, "upstream_server_name": self.upstream_server_name}
        given = [name for name, value in upstream_files.items() if value]
        if given and not self.upstream_tls:
            raise ValueError(f"{', '.join(given)} only apply with upstream_tls=true")
        if bool(self.upstream_cert_file) != bool(self.upstream_key_file):
            raise ValueError("a client certificate towards the upstream needs both upstream_cert_file and "
                             "upstream_key_file")
        return self

    @field_validator("trusted_metadata")
    @classmethod
    def _check_trusted_metadata(cls, value: list[str]) -> list[str]:  # disclosure (issue 13)
        for pair in value:
            key, sep, secret = pair.partition("=")
            if not sep or not key.strip() or not secret:
                raise ValueError(f"trusted_metadata entries are KEY=VALUE with a non-empty value, got {pair.split('=')[0]!r}=...")
        return value

    def disclosure_for(self, model_name: str) -> Disclosure:  # disclosure (issue 13)
        protection = self.models.get(model_name)
        return protection.disclosure if protection and protection.disclosure else self.disclosure

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

    def scoring_failure_for(self, model_name: str) -> ScoringFailure:
        """An explicit ``scoring_failure`` wins; unset: closed where the model's policy is reject, else open.

        Why: ``reject`` is chosen to keep flagged inputs from the model, so a
        request it cannot score must not reach it either; ``annotate`` and
        ``shadow`` put availability first and flag the error instead.
        """
        if self.scoring_failure is not None:
            return self.scoring_failure
        return ScoringFailure.closed if self.policy_for(model_name) is Policy.reject else ScoringFailure.open


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

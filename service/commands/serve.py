"""``advsentry serve``: the sidecar in front of a Triton (an existing one, or an embedded one).

With ``--upstream HOST:PORT`` it fronts that Triton. Without it, it exports the
bundled EfficientNet-Lite0 (logits + feature_response) to a temporary model
repository, launches the ``tritonserver`` binary shipped by nvidia-pytriton on
it, and fronts that: one command gives a working, protected Triton.

SIGTERM/SIGINT drain: health goes NOT_SERVING, new calls are refused,
in-flight calls get ``shutdown_grace_s`` to finish, then Triton is stopped.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .exits import EXIT_CALIBRATION_ERROR, EXIT_USAGE, fail

if TYPE_CHECKING:
    from service.settings import Settings

LOGGER = logging.getLogger("advsentry.serve")


def _option_help(name: str) -> str:
    from service.settings import Settings

    field = Settings.model_fields[name]
    env = f"ADVSENTRY_{name.upper()}"
    default = field.default if field.default is not None else "unset"
    return f"{field.description} (env {env}; default {getattr(default, 'value', default)})"


def settings_assignments(assignments: list[str] | tuple[str, ...]) -> dict[str, object]:
    """``--set KEY=VALUE`` pairs as setting overrides (VALUE parsed as YAML); unknown keys are an error.

    Why: the sidecar has dozens of settings (TLS, disclosure, shedding, traffic
    sketch, probing, capture); the common ones have their own flags, and every
    one is reachable from the command line without a flag per setting.
    """
    import yaml

    from service.settings import Settings

    values: dict[str, object] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in Settings.model_fields:
            raise typer.BadParameter(f"{item!r}: expected KEY=VALUE with KEY a setting name "
                                     f"(see `advsentry serve --help`)", param_hint="--set")
        values[key] = yaml.safe_load(raw) if raw.strip() else None
    return values


async def _run_sidecar(settings, model_identity) -> None:
    from service.grpc.server import Sidecar
    from service.tracing import configure_tracing

    provider = configure_tracing()
    sidecar = await Sidecar(settings, model_identity=model_identity).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    typer.echo(f"advsentry: serving KServe-v2 gRPC on {settings.host}:{sidecar.port}"
               f" -> Triton {sidecar.upstream_address}; metrics on :{sidecar.metrics_port}", err=True)
    await stop.wait()
    LOGGER.info("shutting down: draining in-flight calls for up to %ss", settings.shutdown_grace_s)
    await sidecar.stop()
    if provider is not None:
        provider.shutdown()


def serve(
    port: Annotated[Optional[int], typer.Option(help=_option_help("port"), show_default=False)] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help=_option_help("metrics_port"), show_default=False)] = None,
    upstream: Annotated[Optional[str], typer.Option(help=_option_help("upstream"), show_default=False)] = None,
    calibration: Annotated[Optional[Path], typer.Option(help=_option_help("calibration"), show_default=False)] = None,
    policy: Annotated[Optional[str], typer.Option(help=_option_help("policy"), show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML settings file (same keys as the env variables, "
                                                          "lower case, without the prefix) (env ADVSENTRY_CONFIG_FILE).",
                                                   show_default=False)] = None,
    host: Annotated[Optional[str], typer.Option(help=_option_help("host"), show_default=False)] = None,
    scoring_failure: Annotated[Optional[str], typer.Option(help=_option_help("scoring_failure"), show_default=False)] = None,
    max_batch_size: Annotated[Optional[int], typer.Option(help=_option_help("max_batch_size"), show_default=False)] = None,
    max_batch_delay_ms: Annotated[Optional[float], typer.Option(help=_option_help("max_batch_delay_ms"), show_default=False)] = None,
    entropy_in: Annotated[Optional[str], typer.Option(help=_option_help("entropy_in"), show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help=_option_help("device"), show_default=False)] = None,
    upstream_timeout_s: Annotated[Optional[float], typer.Option(help=_option_help("upstream_timeout_s"), show_default=False)] = None,
    max_message_bytes: Annotated[Optional[int], typer.Option(help=_option_help("max_message_bytes"), show_default=False)] = None,
    shutdown_grace_s: Annotated[Optional[float], typer.Option(help=_option_help("shutdown_grace_s"), show_default=False)] = None,
    model_repository: Annotated[Optional[Path], typer.Option(help=_option_help("embedded_model_repository"), show_default=False)] = None,
    log_level: Annotated[Optional[str], typer.Option(help=_option_help("log_level"), show_default=False)] = None,
    # TLS (issue 13)
    tls_cert_file: Annotated[Optional[Path], typer.Option(help=_option_help("tls_cert_file"), show_default=False,
                                                          rich_help_panel="TLS")] = None,
    tls_key_file: Annotated[Optional[Path], typer.Option(help=_option_help("tls_key_file"), show_default=False,
                                                         rich_help_panel="TLS")] = None,
    tls_client_ca_file: Annotated[Optional[Path], typer.Option(help=_option_help("tls_client_ca_file"),
                                                               show_default=False, rich_help_panel="TLS")] = None,
    tls_require_client_cert: Annotated[Optional[bool], typer.Option(
        help=_option_help("tls_require_client_cert"), show_default=False, rich_help_panel="TLS")] = None,
    upstream_tls: Annotated[Optional[bool], typer.Option(help=_option_help("upstream_tls"), show_default=False,
                                                         rich_help_panel="TLS")] = None,
    upstream_ca_file: Annotated[Optional[Path], typer.Option(help=_option_help("upstream_ca_file"),
                                                             show_default=False, rich_help_panel="TLS")] = None,
    upstream_cert_file: Annotated[Optional[Path], typer.Option(help=_option_help("upstream_cert_file"),
                                                               show_default=False, rich_help_panel="TLS")] = None,
    upstream_key_file: Annotated[Optional[Path], typer.Option(help=_option_help("upstream_key_file"),
                                                              show_default=False, rich_help_panel="TLS")] = None,
    upstream_server_name: Annotated[Optional[str], typer.Option(help=_option_help("upstream_server_name"),
                                                                show_default=False, rich_help_panel="TLS")] = None,
    tls_reload_interval_s: Annotated[Optional[float], typer.Option(help=_option_help("tls_reload_interval_s"),
                                                                   show_default=False, rich_help_panel="TLS")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Any setting by name (repeatable), e.g. --set probing_policy=annotate --set capture_dir=/var/capture; "
             "VALUE is read as YAML (numbers, true/false, [lists]). Every setting also has its ADVSENTRY_<KEY> "
             "env variable and its key in the --config file.", show_default=False)] = None,
    # disclosure & load shedding (issue 13)
    disclosure: Annotated[Optional[str], typer.Option(help=_option_help("disclosure"), show_default=False,
                                                      rich_help_panel="Disclosure & load shedding")] = None,
    trusted_client: Annotated[Optional[list[str]], typer.Option(
        help="A client identity key that gets score disclosure (repeatable): mtls:<subject>, metadata:<value>, "
             "peer:<host> (env ADVSENTRY_TRUSTED_CLIENTS as a JSON list).",
        show_default=False, rich_help_panel="Disclosure & load shedding")] = None,
    detector_api: Annotated[Optional[bool], typer.Option(help=_option_help("detector_api"), show_default=False,
                                                         rich_help_panel="Disclosure & load shedding")] = None,
    max_in_flight: Annotated[Optional[int], typer.Option(help=_option_help("max_in_flight"), show_default=False,
                                                         rich_help_panel="Disclosure & load shedding")] = None,
    max_in_flight_per_client: Annotated[Optional[int], typer.Option(
        help=_option_help("max_in_flight_per_client"), show_default=False,
        rich_help_panel="Disclosure & load shedding")] = None,
) -> None:
    """Run the advsentry sidecar: a transparent KServe-v2 gRPC proxy that scores every input.

    Settings come from flags, then ADVSENTRY_* environment variables, then the
    YAML file (--config), then defaults. Per-model protection (which outputs
    hold the feature maps, policy, calibration) is set with `models:` in the
    YAML file or ADVSENTRY_MODELS (JSON). Tracing: standard OTEL_* variables
    (e.g. OTEL_EXPORTER_OTLP_ENDPOINT) enable OTLP export; off by default.
    Scoring failures: scoring_failure=open forwards the output with an
    advsentry_error parameter, closed answers INTERNAL.
    TLS: --tls-cert-file/--tls-key-file turn TLS on for the listener (plaintext
    is then refused), --tls-client-ca-file with --tls-require-client-cert make it
    mTLS, --upstream-tls (+ CA, client certificate, server name) secures the
    connection to Triton; changed files are picked up without a restart.
    Disclosure: --disclosure none|verdict|score says what clients learn (default
    verdict: flags, no score or threshold); trusted callers (--trusted-client, or
    trusted_metadata KEY=VALUE in the file/env, a shared secret header) always get
    score. Load shedding: --max-in-flight / --max-in-flight-per-client refuse
    requests beyond them with RESOURCE_EXHAUSTED.
    """
    flags = dict(
        port=port, metrics_port=metrics_port, upstream=upstream, calibration=calibration, policy=policy,
        host=host, scoring_failure=scoring_failure, max_batch_size=max_batch_size,
        max_batch_delay_ms=max_batch_delay_ms, entropy_in=entropy_in, device=device, upstream_timeout_s=upstream_timeout_s,
        max_message_bytes=max_message_bytes, shutdown_grace_s=shutdown_grace_s,
        embedded_model_repository=model_repository, log_level=log_level,
        tls_cert_file=tls_cert_file, tls_key_file=tls_key_file, tls_client_ca_file=tls_client_ca_file,
        tls_require_client_cert=tls_require_client_cert, upstream_tls=upstream_tls,
        upstream_ca_file=upstream_ca_file, upstream_cert_file=upstream_cert_file,
        upstream_key_file=upstream_key_file, upstream_server_name=upstream_server_name,
        tls_reload_interval_s=tls_reload_interval_s,
        disclosure=disclosure, trusted_clients=trusted_client or None, detector_api=detector_api,
        max_in_flight=max_in_flight, max_in_flight_per_client=max_in_flight_per_client,
    )
    settings = settings_from_command_line(config, flags, set_ or ())
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_sidecar(settings)


def settings_from_command_line(config: Path | None, flags: dict[str, object], assignments) -> "Settings":
    """Flags, then ``--set`` pairs (a dedicated flag wins), env and the YAML file; invalid settings exit 2."""
    from pydantic import ValidationError

    from service.settings import load_settings

    try:
        for key, value in settings_assignments(assignments).items():
            if flags.get(key) is None:
                flags[key] = value
        settings = load_settings(config, **flags)
        if settings.upstream is None and settings.upstream_tls:
            raise ValueError("upstream_tls needs --upstream: the embedded Triton listens on loopback without TLS")
    except (ValidationError, ValueError) as error:
        fail(f"invalid settings: {error}", EXIT_USAGE)
    return settings


def run_sidecar(settings: "Settings") -> None:
    """Start the embedded Triton when no upstream is set, serve until SIGTERM/SIGINT, stop Triton last."""
    from detector import CalibrationError
    from service.tls import TlsError

    triton = workdir = None
    identity: dict = {}
    try:
        if settings.upstream is None:
            settings, identity, workdir = embedded_model_repository(settings)
            typer.echo(f"advsentry: starting embedded Triton on {settings.embedded_model_repository}", err=True)
            from service.triton.server import TritonServer

            triton = TritonServer(settings.embedded_model_repository).start()
            settings = settings.model_copy(update={"upstream": triton.grpc_address})
        asyncio.run(_run_sidecar(settings, identity))
    except CalibrationError as error:
        fail(f"{error}", EXIT_CALIBRATION_ERROR)
    except TlsError as error:
        fail(f"TLS: {error}", EXIT_USAGE)
    finally:
        if triton is not None:
            triton.stop()
        if workdir is not None:
            workdir.cleanup()


def embedded_model_repository(settings: "Settings"):
    """The embedded Triton's repository: the given one, or the bundled model exported for the calibration in force.

    Returns (settings with the repository and, for the bundled model, its
    default calibration; the identities of the models, as ``export-model``
    recorded them, so that a calibration fitted for other weights is refused;
    the temporary directory to remove on stop, or None). The exported model serves the
    signals of the calibration in force (the shipped default's unless one is
    given), so the sidecar scores it with one small output per image.
    """
    if settings.embedded_model_repository is not None:
        from service.triton.export import repository_identities

        # each exported model's identity: a calibration fitted for other weights is refused (issue 21)
        return settings, repository_identities(settings.embedded_model_repository), None
    from detector.detector import resolve_detector
    from detector.models import BUNDLED_MODEL_NAME, bundled_identity
    from service.triton.export import export_model_repository

    workdir = tempfile.TemporaryDirectory(prefix="advsentry-repo-")
    repository = Path(workdir.name)
    features = resolve_detector(settings.calibration).features if settings.calibration else None
    export_model_repository(repository, max_batch_size=settings.embedded_max_batch_size, features=features)
    update: dict[str, object] = {"embedded_model_repository": repository}
    if settings.calibration is None and not any(m.calibration for m in settings.models.values()):
        from detector import DEFAULT_ARTIFACT_PATH  # the bundled model ships with its calibrated default

        update["calibration"] = DEFAULT_ARTIFACT_PATH
    return settings.model_copy(update=update), {BUNDLED_MODEL_NAME: bundled_identity()}, workdir


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)

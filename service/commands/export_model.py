"""``advsentry export-model``: write a Triton model repository serving logits + feature responses."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .contract_options import InputDtype, InputLayout, InputNormalize, InputScale, input_contract
from .exits import EXIT_USAGE, EXIT_CALIBRATION_ERROR, EXIT_INPUT_ERROR, fail


def export_model(
    out: Annotated[Path, typer.Option(help="Model repository directory to write (created if missing).")],
    name: Annotated[str, typer.Option(help="Model name in the repository.")] = "efficientnet-lite0",
    factory: Annotated[Optional[str], typer.Option(
        help="'package.module:function' returning your eager nn.Module (takes [B,3,H,W] pixels in [0,1], or what "
             "the --input-* flags declare); "
             "default: the bundled EfficientNet-Lite0. Must be importable where Triton runs.",
        show_default=False)] = None,
    weights: Annotated[Optional[Path], typer.Option(
        help="State dict (torch.save) loaded into the factory's module; copied into the repository.",
        show_default=False)] = None,
    torchscript: Annotated[Optional[Path], typer.Option(
        help="A TorchScript file: refused with the reason (guided backprop needs the eager module); "
             "use --factory/--weights.", show_default=False)] = None,
    calibration: Annotated[Optional[str], typer.Option(
        help="Calibration artifact (FILE, or a shipped detector's name: default, fixed-signals, entropy-9photo, paper) whose "
             "signals the model must return (default: the study's default detector for the bundled model, the "
             "model-agnostic guided-backprop map for --factory models).",
        show_default=False)] = None,
    input_layout: InputLayout = "nchw",
    input_scale: InputScale = 1.0,
    input_normalize: InputNormalize = None,
    input_dtype: InputDtype = "float32",
    image_size: Annotated[int, typer.Option(min=32, help="Input height and width.")] = 224,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Triton max_batch_size.")] = 8,
    gpu: Annotated[bool, typer.Option("--gpu", help="KIND_GPU instances instead of KIND_CPU.")] = False,
    instances: Annotated[int, typer.Option(min=1, help="Model instances.")] = 1,
) -> None:
    """Write OUT/NAME/config.pbtxt and OUT/NAME/1/model.py (Python backend) with outputs logits + feature maps."""
    from detector import DEFAULT_FEATURES, GENERIC_FEATURES, CalibrationError
    from detector.detector import resolve_detector
    from service.triton.export import ExportError, ModelSource, export_model_repository

    if torchscript is not None:
        fail("TorchScript models cannot be exported: guided backpropagation intercepts the activation "
             "calls of the eager nn.Module; pass --factory module:function (and --weights for a state dict)",
             EXIT_INPUT_ERROR)
    # The default detector reads named layers of the bundled EfficientNet-Lite0;
    # a user's model gets the model-agnostic map until it has its own calibration.
    features = DEFAULT_FEATURES if factory is None else GENERIC_FEATURES
    if calibration is not None:
        try:
            features = resolve_detector(calibration).features
        except CalibrationError as error:
            fail(f"{error}", EXIT_CALIBRATION_ERROR)
    if weights is not None and factory is None:
        fail("--weights needs --factory (the module the state dict belongs to)", EXIT_USAGE)
    contract = input_contract(input_layout, input_scale, input_normalize, input_dtype)
    if factory is None and not contract.is_default:
        fail("--input-* flags declare how your own model (--factory) takes its input; the bundled model takes "
             "advsentry's pixels", EXIT_USAGE)
    source = ModelSource()
    if factory is not None:
        source = ModelSource("state_dict" if weights else "factory", factory, weights,
                             None if contract.is_default else contract)
    try:
        path = export_model_repository(
            out, model_name=name, source=source, features=features, image_size=image_size,
            max_batch_size=max_batch_size, instance_kind="gpu" if gpu else "cpu", instances=instances,
        )
    except ExportError as error:
        fail(f"{error}", EXIT_INPUT_ERROR)
    typer.echo(f"wrote {path} (outputs: logits, {', '.join(features)})")


def register(app: typer.Typer) -> None:
    app.command("export-model")(export_model)

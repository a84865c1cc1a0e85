"""The ``--input-*`` flags shared by ``calibrate run``/``verify`` and ``export-model``: a model's input contract.

One definition so that the three commands spell, document and validate the
contract the same way (:mod:`detector.contract`); a model calibrated with
``--input-layout nhwc`` must be exported with it too, or its identity differs.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .exits import EXIT_USAGE, fail

InputLayout = Annotated[str, typer.Option(
    "--input-layout", help="Your model's input layout: nchw (advsentry's) or nhwc; advsentry's pixels are transposed for it.")]
InputScale = Annotated[float, typer.Option(
    "--input-scale", help="Your model takes pixels times this: 1 ([0, 1], advsentry's) or 255 (0..255).")]
InputNormalize = Annotated[Optional[str], typer.Option(
    "--input-normalize", help="Normalization your model expects outside it: imagenet (torchvision's, scaled with --input-scale), or MEAN,MEAN,MEAN/STD,STD,STD "
                              "(after --input-scale); default none (normalization inside the module).",
    show_default=False)]
InputDtype = Annotated[str, typer.Option(
    "--input-dtype", help="Your model's input dtype: float32, float16 or bfloat16 (logits come back as float32).")]


def input_contract(layout: str, scale: float, normalize: str | None, dtype: str):  # -> InputContract
    """The declared contract, or a usage error (exit 2) naming what is wrong."""
    from detector.contract import ContractError, InputContract

    try:
        return InputContract.parse(layout, scale, normalize, dtype)
    except ContractError as error:
        fail(str(error), EXIT_USAGE)

"""Shared fixtures: devices to run on, the bundled model, the bundled photos."""

from __future__ import annotations

import pytest
import torch

#: Every device available here; CUDA joins automatically on a GPU machine, so
#: the same equality tests cover the CUDA code path there.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session", autouse=True)
def _no_installed_corpus(tmp_path_factory):
    """Point ``ADVSENTRY_CORPUS_DIR`` at an empty folder for the whole session.

    Why: without it, whether a real-photo corpus happens to be installed on
    the machine (``~/.cache/advsentry/corpus``) would change which clean
    images calibration jobs use, and so their results. Session scope, so
    that module- and session-scoped fixtures (which run before function-scoped
    ones) see it too. A test that wants a corpus opts in with
    ``monkeypatch.setenv("ADVSENTRY_CORPUS_DIR", ...)`` (undone after the test)
    or passes the folder explicitly.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADVSENTRY_CORPUS_DIR", str(tmp_path_factory.mktemp("no-corpus")))
        yield


@pytest.fixture(scope="session")
def bundled_model():
    from detector.models import load_bundled_model

    return load_bundled_model("cpu")


@pytest.fixture(scope="session")
def photo_batch():
    """Four bundled photos as a ``[4, 3, 224, 224]`` pixel batch."""
    from detector.samples import full_photo_samples, to_tensor

    return to_tensor([sample.pixels() for sample in full_photo_samples()[:4]])


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """A real tritonserver serving the exported bundled model, one per test module that asks for it.

    Per module, not per session: some modules kill or restart it on purpose.
    Modules that need another repository define their own ``triton``.
    """
    from e2e_triton import export_bundled
    from service.triton.server import TritonServer

    server = TritonServer(export_bundled(tmp_path_factory.mktemp("repo")))
    server.start()
    yield server
    server.stop()

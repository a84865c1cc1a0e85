"""Triton side of the sidecar: writing model repositories and running the tritonserver binary.

``export`` writes a standard Triton model repository (``config.pbtxt`` + a
Python-backend ``model.py``) whose model returns ``logits`` and the detector's
feature-response outputs; ``server`` launches the ``tritonserver`` binary that
the ``nvidia-pytriton`` wheel ships on such a repository. The embedded default
of ``advsentry serve`` is exactly these two steps, so the embedded mode runs
the same files a production Triton loads.
"""

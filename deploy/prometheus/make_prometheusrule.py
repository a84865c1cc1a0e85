"""Write deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/advsentry-rules.yaml.

Why generated: the rule file is what plain Prometheus loads and what
``promtool`` and the tests check; Prometheus Operator users need the same
groups wrapped in a ``PrometheusRule``. One source, one generated copy, and a
test (tests/test_deploy_manifests.py) fails when the copy is stale.

Usage: ``python deploy/prometheus/make_prometheusrule.py [--check]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "advsentry-rules.yaml"
TARGET = HERE.parent / "k8s" / "base" / "prometheusrule.yaml"
HEADER = (
    "# GENERATED from deploy/prometheus/advsentry-rules.yaml by\n"
    "# `python deploy/prometheus/make_prometheusrule.py`; edit the rule file, not this one.\n"
    "# Runbook text for every alert is in its `runbook` annotation.\n"
)


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so PromQL stays readable."""


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "advsentry", "labels": {"app.kubernetes.io/name": "advsentry"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python deploy/prometheus/make_prometheusrule.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Small pieces every manifest shares: names, labels, metadata and the YAML writer."""

from __future__ import annotations

import yaml

from workbench.config import ConfigError, DeployConfig

PART_OF = "llm-workbench"


class DeployError(ConfigError):
    """Manifests that cannot be rendered from these params or reports; the message says which."""


def labels(name: str, variant: str, component: str) -> dict[str, str]:
    """Recommended Kubernetes labels. ``app.kubernetes.io/name`` is also the ServiceMonitors'
    jobLabel, so Prometheus' job is ``vllm`` / ``workbench-gateway`` as deploy/prometheus/alerts.yml expects."""
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": PART_OF, "workbench.io/variant": variant}


def meta(name: str, dep: DeployConfig, lbls: dict[str, str], **extra) -> dict:
    return {"name": name, "namespace": dep.namespace, "labels": lbls, **extra}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, JSON, shell) as literal blocks, so the files read like the sources;
    no anchors and aliases (a shared dict is written out each time)."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict], header: str = "") -> str:
    """Documents as one YAML file, ``header`` as a leading comment block."""
    head = "".join(f"# {line}".rstrip() + "\n" for line in header.strip().splitlines()) if header else ""
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
                        for d in docs)
    return head + body

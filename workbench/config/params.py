"""The whole ``params.yaml`` (``Params``: every section, with the values derived across sections),
read from the file with CLI overrides on top, and one stage's config from it::

    python -c "from workbench.config import load_params; load_params('params.yaml')"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, model_validator

from workbench.config.base import (PARAMS_FILE, ConfigError, ProjectConfig, Section, _describe, apply_overrides,
                                   deep_merge)
from workbench.config.evaluate import EvaluateConfig
from workbench.config.loadtest import LoadtestConfig
from workbench.config.models import PrepareConfig, QuantizeConfig, ShardConfig
from workbench.config.report import DeployConfig, ReportConfig
from workbench.config.serve import ServeConfig, ServerConfig
from workbench.config.speed import SpeedConfig
from workbench.variants import BASE as BASE_VARIANT


class Params(Section):
    """The whole params.yaml. Sections are named after the stages that read them."""

    project: ProjectConfig = ProjectConfig()
    prepare: PrepareConfig = PrepareConfig()
    serve: ServeConfig = ServeConfig()
    loadtest: LoadtestConfig = LoadtestConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    shard: ShardConfig = ShardConfig()
    report: ReportConfig = ReportConfig()
    deploy: DeployConfig = DeployConfig()
    speed: SpeedConfig = SpeedConfig()

    @model_validator(mode="before")
    @classmethod
    def _loadtest_server_is_serve_chat(cls, data: Any) -> Any:
        """The load test's managed server is serve.chat unless loadtest.server is given."""
        if isinstance(data, dict) and isinstance(data.get("serve"), dict):
            chat, lt = data["serve"].get("chat"), data.get("loadtest") or {}
            if isinstance(chat, dict) and isinstance(lt, dict) and "server" not in lt:
                data = {**data, "loadtest": {**lt, "server": chat}}
        return data

    @model_validator(mode="after")
    def _derived(self) -> "Params":
        """Fill what params.yaml leaves null from its one home: the served name from
        prepare.model.name, the variant lists from quantize.variants (base first). A stage's
        notebook receives its section with these filled in."""
        name = self.prepare.model.name

        def named(server: ServerConfig, default: str) -> ServerConfig:
            return server if server.served_name else server.model_copy(update={"served_name": default})

        quantized = list(self.quantize.variants)
        served = [v for v, q in self.quantize.variants.items() if q.serve]
        embedding = self.serve.embedding
        if embedding is not None and self.prepare.embedding is not None:
            embedding = named(embedding, self.prepare.embedding.name)
        elif embedding is not None:
            embedding = named(embedding, Path(embedding.model_dir).name)
        arms = {a.name: a for a in self.loadtest.arms}  # evaluated under their names, as load-tested
        evaluate = self.evaluate.model_copy(update={
            "server": named(self.evaluate.server, name),
            "variants": self.evaluate.variants if self.evaluate.variants is not None
            else [v for v in served if v != self.evaluate.baseline] + list(arms)})
        if self.evaluate.variant in arms:
            evaluate = evaluate.for_arm(arms[self.evaluate.variant])
        derived = {
            "serve": self.serve.model_copy(update={"chat": named(self.serve.chat, name), "embedding": embedding}),
            "evaluate": evaluate,
            "shard": self.shard.model_copy(update={"server": named(self.shard.server, name)}),
            "loadtest": self.loadtest.model_copy(update={
                "server": named(self.loadtest.server, name),
                "variants": self.loadtest.variants if self.loadtest.variants is not None
                else [BASE_VARIANT, *served]}),
            "report": self.report.model_copy(update={
                "variants": self.report.variants if self.report.variants is not None
                else [BASE_VARIANT, *quantized]}),
        }
        if "baseline" in self.report.model_fields_set and self.report.baseline != self.evaluate.baseline:
            raise ValueError(f"report.baseline ({self.report.baseline!r}) differs from evaluate.baseline "
                             f"({self.evaluate.baseline!r}): the baseline's one home is evaluate.baseline; "
                             "set it there and leave report.baseline out")
        derived["report"] = derived["report"].model_copy(update={"baseline": self.evaluate.baseline})
        lt_variants = derived["loadtest"].variants
        unknown = [v for v in self.loadtest.gateway_arms if v not in lt_variants]
        if unknown:
            raise ValueError(f"loadtest.gateway_arms {unknown} are not among the compared loadtest.variants "
                             f"{lt_variants}: a gateway arm shares its variant's server")
        unknown = [v for v in derived["evaluate"].variants if v not in {*quantized, BASE_VARIANT, *arms}]
        if unknown:
            raise ValueError(f"evaluate.variants {unknown} are not keys of quantize.variants {quantized} "
                             f"(dvc.yaml has an evaluate stage per key) nor names of loadtest.arms {list(arms)}")
        try:  # the speed stage's load tests: this load test with speed.loadtest's keys over it
            resolved = LoadtestConfig.model_validate(deep_merge(derived["loadtest"].model_dump(), self.speed.loadtest))
        except ValidationError as err:
            raise ValueError(f"speed.loadtest: {err}") from None
        derived["speed"] = self.speed.model_copy(update={"resolved": resolved})
        for key, value in derived.items():
            object.__setattr__(self, key, value)  # frozen sections: replaced whole, once, here
        return self


def load_params(path: str | Path = PARAMS_FILE, overrides: list[str] = ()) -> Params:
    """Read and validate the whole params file; raises ConfigError naming every bad key."""
    path = Path(path)
    if path.exists():
        data = yaml.safe_load(path.read_text()) or {}
    elif path.name == PARAMS_FILE and not path.is_absolute():
        data = {}  # running outside a project: defaults only
    else:
        raise ConfigError(f"params file not found: {path}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, Params, str(path))) from None


def stage_config(stage: str, values: dict | None = None, params_file: str | Path = PARAMS_FILE):
    """One stage's config: from ``values`` when given (papermill), else from the params file."""
    if values:
        cls = Params.model_fields[stage].annotation
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise ConfigError(_describe(err, cls, f"'{stage}' parameters", section=f"{stage}.")) from None
    return getattr(load_params(params_file), stage)

"""Typed configuration for every stage, read from ``params.yaml`` with CLI overrides on top.

Precedence: CLI ``--set section.key=value`` > ``params.yaml`` > the defaults in these modules.
Every model forbids unknown keys, so a typo fails before any work and names the key::

    python -c "from workbench.config import load_params; load_params('params.yaml')"

One module per section or group of sections, each config next to its defaults and their reasons:
base (the Section base, ``project``, overrides and error messages), serve (vLLM and llama.cpp
servers), models (prepare, quantize, shard), load (workload, slo, knee, steady_state), loadtest
(arms and the load test), evaluate, report (report, prices, deploy), speed, and params (the whole
file, ``load_params``, ``stage_config``). Callers import every name from here.
"""

from workbench.config.base import (PARAMS_FILE, ComputeDtype, ConfigError, Dtype, ProjectConfig, REMOVED_KEYS,
                                   Section, _suggest, apply_overrides, deep_merge, parse_override)
from workbench.config.evaluate import ChatEvalConfig, EvalSuiteConfig, EvaluateConfig, PerplexityEvalConfig
from workbench.config.load import KneeConfig, SLOConfig, SteadyStateConfig, WorkloadConfig
from workbench.config.loadtest import ArmConfig, ArmName, LlamaCppArm, LoadtestConfig, UrlArm, VllmArm
from workbench.config.models import (CalibrationConfig, ModelSource, PrepareConfig, QuantCheckConfig,
                                     QuantizeConfig, QuantVariantConfig, ShardConfig)
from workbench.config.params import Params, load_params, stage_config
from workbench.config.report import (DeployConfig, DeployGatewayConfig, DeployStorageConfig, PriceConfig,
                                     ReportConfig)
from workbench.config.serve import LlamaCppConfig, ServeConfig, ServerConfig
from workbench.config.speed import SPEED_PRECISIONS, LayoutConfig, ShapeConfig, SpeedConfig
from workbench.variants import BASE as BASE_VARIANT

__all__ = [
    "ArmConfig", "ArmName", "BASE_VARIANT", "CalibrationConfig", "ChatEvalConfig", "ComputeDtype", "ConfigError",
    "DeployConfig", "DeployGatewayConfig", "DeployStorageConfig", "Dtype", "EvalSuiteConfig", "EvaluateConfig",
    "KneeConfig", "LayoutConfig", "LlamaCppArm", "LlamaCppConfig", "LoadtestConfig", "ModelSource", "PARAMS_FILE",
    "Params", "PerplexityEvalConfig", "PrepareConfig", "PriceConfig", "ProjectConfig", "QuantCheckConfig",
    "QuantVariantConfig", "QuantizeConfig", "REMOVED_KEYS", "ReportConfig", "SLOConfig", "SPEED_PRECISIONS",
    "Section", "ServeConfig", "ServerConfig", "ShapeConfig", "ShardConfig", "SpeedConfig", "SteadyStateConfig",
    "UrlArm", "VllmArm", "WorkloadConfig", "_suggest", "apply_overrides", "deep_merge", "load_params",
    "parse_override", "stage_config",
]

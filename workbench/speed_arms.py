"""The speed stage's arms: their names (shape x precision x layout), each one's model folder and
serve.chat keys, the load-test config a run starts from, and the arms the knee search runs on."""

from __future__ import annotations

from pathlib import Path

from workbench import layouts, shapes
from workbench.config import LoadtestConfig, SpeedConfig


def arm_specs(cfg: SpeedConfig) -> dict[str, tuple[str, str, str]]:
    """{arm name: (shape, precision, layout)}: shape x precision x the shape's layouts. One layout
    in speed.layouts: ``<shape>-<precision>`` (the names before layouts); several: ``...-<layout>``."""
    suffix = len(cfg.layouts) > 1
    return {f"{name}-{precision}" + (f"-{lname}" if suffix else ""): (name, precision, lname)
            for name, shape in cfg.shapes.items() for precision in cfg.precisions
            for lname in (shape.layouts or cfg.layouts)}


def arms(cfg: SpeedConfig) -> dict[str, dict]:
    """{arm name: serve.chat keys}: each shape's model folder per precision, built here (one per
    shape and precision, shared by its layouts), served in the arm's layout."""
    from workbench.serve import detect_device

    server = (cfg.resolved or LoadtestConfig()).server
    device = detect_device() if server.device == "auto" else server.device
    layouts.check_speed(cfg)  # every layout against its shape before any folder is built
    for lname, layout in cfg.layouts.items():
        layouts.refuse_on_cpu(lname, layout, device)
    out, built = {}, {}
    for arm, (name, precision, lname) in arm_specs(cfg).items():
        shape, layout = cfg.shapes[name], cfg.layouts[lname]
        if (name, precision) not in built:
            built[name, precision] = shapes.build(shape.config, precision, Path(cfg.out_dir) / "models" / f"{name}-{precision}",
                                                  shape.tokenizer, Path(cfg.out_dir) / "cache")
        folder = built[name, precision]
        out[arm] = {**shapes.server_overrides(folder, precision), "served_name": arm,
                    **layouts.server_keys(layout, device, server.env)}
    return out


def run_config(cfg: SpeedConfig, arm_keys: dict[str, dict], part: str, **update) -> LoadtestConfig:
    base = cfg.resolved or LoadtestConfig()
    return base.model_copy(update={
        "variants": list(arm_keys), "variant": None, "model_dir": None, "model": None, "base_url": None,
        "server_overrides": {**base.server_overrides, **arm_keys}, "out_dir": f"{cfg.out_dir}/{part}",
        "gateway_arms": [], "via_gateway": False, **update})


def knee_arms(cfg: SpeedConfig, names: list[str]) -> list[str]:
    """The arms the knee search runs on: ``speed.knee_arms`` (each named arm must exist), else the first."""
    if cfg.knee_arms is None:
        return names[:1]
    unknown = [a for a in cfg.knee_arms if a not in names]
    if unknown or not cfg.knee_arms:
        raise ValueError(f"speed.knee_arms {cfg.knee_arms}: {unknown or 'empty'}; the arms are {names}")
    return list(cfg.knee_arms)

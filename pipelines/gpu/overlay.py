"""Apply a params overlay (e.g. pipelines/gpu/params-gpu.yaml) to params.yaml, keeping its comments.

    python -m pipelines.gpu.overlay pipelines/gpu/params-gpu.yaml            # merge into params.yaml
    python -m pipelines.gpu.overlay pipelines/gpu/params-gpu.yaml --check    # only list the changes
    python -m pipelines.gpu.overlay pipelines/gpu/params-gpu.yaml --set-args # as `dvc exp run` -S args
    python -m pipelines.gpu.overlay pipelines/gpu/params-gpu.yaml --variants gptq-int4  # and keep only
        these of quantize.variants (a shorter run: fewer quantize, evaluate and load-test stages)

DVC reads params.yaml, so a profile (a GPU host's memory share, load and batch sizes) is merged into
it: mappings key by key, anything else (lists, scalars) replaced whole. A profile removes a variant
with ``quantize.variants.<name>: null`` (params-gpu2.yaml: gptq-int3), so the variants a run
compares are written in its profile, not in a command line. The merged file is validated
like every stage does (a misspelled key stops it, named) before it is written. `dvc repro` then
re-runs the stages whose params changed; `git diff params.yaml` shows what the profile set.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import yaml


def leaves(overlay: dict, prefix: str = ""):
    """(dotted.key, value) for every non-mapping value of the overlay."""
    for key, value in overlay.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{path}.")
        else:
            yield path, value


def removed_variants(overlay: dict) -> list[str]:
    """The variants a profile removes, ``quantize.variants.<name>: null`` (a variant is never null),
    taken out of ``overlay`` in place so that the rest merges as usual."""
    quantize = overlay.get("quantize")
    variants = quantize.get("variants") if isinstance(quantize, dict) else None
    if not isinstance(variants, dict):
        return []
    removed = [name for name, value in variants.items() if value is None]
    for name in removed:
        del variants[name]
    if not variants:  # an empty mapping would replace the whole list of variants
        del quantize["variants"]
        if not quantize:
            del overlay["quantize"]
    return removed


def merge(base, overlay: dict, flow=None) -> None:
    """Merge ``overlay`` into the mapping ``base`` in place (ruamel's CommentedMap keeps comments);
    ``flow`` turns a list into the one-line form params.yaml uses."""
    for key, value in overlay.items():
        if isinstance(value, dict) and value and isinstance(base.get(key), dict):
            merge(base[key], value, flow)
        else:
            base[key] = flow(value) if flow and isinstance(value, list) else value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overlay")
    ap.add_argument("--params", default="params.yaml")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="list the keys the overlay sets; write nothing")
    mode.add_argument("--set-args", action="store_true", help="print `-S key=value` arguments for dvc exp run")
    ap.add_argument("--variants", help="comma-separated quantize.variants keys to keep (the others are "
                    "removed from params.yaml; base always stays)")
    args = ap.parse_args(argv)

    overlay = yaml.safe_load(Path(args.overlay).read_text()) or {}
    if not isinstance(overlay, dict):
        raise SystemExit(f"{args.overlay} must hold a mapping of sections")
    removed = removed_variants(overlay)
    if args.set_args:
        if removed:
            raise SystemExit(f"{args.overlay} removes quantize.variants {', '.join(removed)}: `dvc exp run -S` "
                             "cannot remove a key; merge the profile instead")
        print(" ".join(f"-S '{k}={json.dumps(v)}'" for k, v in leaves(overlay)))
        return 0

    from ruamel.yaml import YAML  # DVC's own YAML library (round trip: comments and order kept)
    from ruamel.yaml.comments import CommentedSeq

    from workbench.config import Params

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(  # null stays "null", as params.yaml writes it
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))

    def flow(items: list) -> CommentedSeq:
        seq = CommentedSeq(items)
        seq.fa.set_flow_style()
        return seq
    params_path = Path(args.params)
    doc = rt.load(params_path.read_text())
    plain = yaml.safe_load(params_path.read_text())
    merge(plain, overlay)
    have = list(plain["quantize"]["variants"])
    for name in removed:  # absent: merged before (a second merge changes nothing), or misspelled
        if name not in have:
            print(f"quantize.variants.{name}: null, and {params_path} has no such variant "
                  f"({', '.join(have)})", file=sys.stderr)
    drop = [v for v in removed if v in have]
    for name in drop:
        del plain["quantize"]["variants"][name]
    if args.variants is not None:
        keep = [v for v in args.variants.split(",") if v]
        have = list(plain["quantize"]["variants"])
        unknown = [v for v in keep if v not in have]
        if unknown:
            raise SystemExit(f"--variants: {', '.join(unknown)} not in quantize.variants of {params_path} "
                             f"({', '.join(have)})")
        for name in [v for v in have if v not in keep]:
            del plain["quantize"]["variants"][name]
            drop.append(name)
    from workbench import layouts

    try:
        layouts.check_speed(Params.model_validate(plain).speed)  # a layout its shape cannot take, named
    except Exception as err:  # pydantic's ValidationError, named by the config module's wording
        raise SystemExit(f"{args.overlay} over {params_path}: {err}") from None
    for key, value in leaves(overlay):
        print(f"{key} = {json.dumps(value)}")
    for name in drop:
        print(f"quantize.variants.{name} removed")
    if args.check:
        return 0
    merge(doc, overlay, flow)
    for name in drop:
        del doc["quantize"]["variants"][name]
    buf = io.StringIO()
    rt.dump(doc, buf)
    params_path.write_text(buf.getvalue())
    print(f"{args.overlay} merged into {params_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

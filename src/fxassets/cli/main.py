"""The `fxassets` command line: `stage`, `report`, `detect`, ..."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fxassets.core.config import ConfigError, load_params
from fxassets.core.paths import STAGES
from fxassets.teachers.base import TeacherError


ONLY_STAGE_ENV = "FXASSETS_ONLY_STAGE"  # the one STAGE@EFFECT this checkout may compute ("none": restore only)


def _cmd_stage(args: argparse.Namespace) -> int:
    from fxassets.stages import run_stage

    only, name = os.environ.get(ONLY_STAGE_ENV), f"{args.name}@{args.effect}"
    if only and only != name:  # a workspace that restores its inputs from the remote: never recompute one here
        allowed = "restores only" if only == "none" else f"computes only {only}"
        raise ValueError(f"{name} is not in the remote, and this checkout {allowed} (${ONLY_STAGE_ENV}): "
                         f"build {name} first (or push it from where it was built)")
    params = load_params(args.params)
    summary = run_stage(args.name, params, args.effect, Path("."), progress=not args.no_progress)
    print(json.dumps({"stage": args.name, "effect": args.effect, **summary}, default=str))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fxassets.cli.report import effect_rows, format_table

    status = None
    if args.dvc_status:
        try:
            status = json.loads(Path(args.dvc_status).read_text() or "{}")
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{args.dvc_status}: not the output of `dvc status --json` ({exc})") from exc
    rows = effect_rows(load_params(args.params), dvc_status=status)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 1 if any(r["failed"] for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fxassets", description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="the pipeline config (default: params.yaml)")
    sub = ap.add_subparsers(dest="command", required=True)

    st = sub.add_parser("stage", help="run one pipeline stage for one effect (what dvc.yaml calls)")
    st.add_argument("name", choices=STAGES)
    st.add_argument("--effect", required=True)
    st.add_argument("--no-progress", action="store_true", help="no progress bars")
    st.set_defaults(func=_cmd_stage)

    rp = sub.add_parser("report", help="the per-effect summary table of what the pipeline made")
    rp.add_argument("--json", action="store_true")
    rp.add_argument("--dvc-status", metavar="FILE", help="`dvc status --json` output: effects with a changed stage "
                    "are reported as not built (what `make run` passes)")
    rp.set_defaults(func=_cmd_report)

    from fxassets.cli import apply as apply_cli, bench as bench_cli, detect as detect_cli, evaluate as evaluate_cli
    from fxassets.cli import generate_sources

    for module in (detect_cli, apply_cli, bench_cli, evaluate_cli, generate_sources):
        module.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("FXASSETS_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except OSError as exc:  # no permission, a full disk, a folder where a file should be: the path and why
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        print(f"fxassets: error: {f'{where}: {exc.strerror}' if where and exc.strerror else exc}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError, TeacherError) as exc:  # TeacherError: an API that gave up, naming the sample
        print(f"fxassets: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

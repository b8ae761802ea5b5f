"""`fxassets evaluate`: a built student against its teacher on a folder of your own photos (`fxassets.evaluation`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from fxassets.evaluation import ENGINES

    p = subparsers.add_parser("evaluate", help="measure a built student against the teacher on a folder of photos")
    p.add_argument("--effect", required=True)
    p.add_argument("--input", required=True, type=Path, help="a photo or a folder of photos (JPEG / PNG)")
    p.add_argument("--engine", nargs="+", choices=ENGINES, default=["int8"],
                   help="which built model(s) to measure (default int8)")
    p.add_argument("--json", type=Path, help="write the report (medians, per face, unusable photos) here")
    p.add_argument("--grid", type=Path, help="write a before / teacher / student grid PNG here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fxassets.core.atomic import write_json
    from fxassets.core.config import load_params
    from fxassets.evaluation import evaluate, format_report

    params = load_params(args.params)
    engines = tuple(dict.fromkeys(args.engine))
    report = evaluate(params, args.effect, args.input, engines, Path("."), progress=not args.no_progress,
                      grid=args.grid)
    if args.json:
        write_json(args.json, report)
    print(format_report(report, engines))
    return 0 if report["n"] else 1

"""The pair quality gate: a great-expectations (GX Core 1.x) suite over the face_pairs manifest.

Two suites run on the manifest, in an ephemeral GX context:

* ``pair_rows``: one expectation per row-level check (`ROW_CHECKS`, plus near-duplicates). A pair outside a bound
  is rejected (``status = "reject"``) with a readable reason, e.g. ``identity distance 0.74 > 0.7``.
* ``pair_set``: set-level expectations on the manifest after those rejections: pass rate, near-duplicates, the
  share of identity-preserving pairs; and, when ``quality.balance`` is on, ``pair_balance`` on the balance table
  (every estimated skin-tone group holds at least ``min_group_share`` of the kept pairs).

The face_pairs stage always completes; it writes `gate.json` (passed, set-level results with observed values and
thresholds, rejection counts by check), the GX Data Docs under `gx_docs/` and the balance report
(`balance.csv`, `balance.png`). Training calls `require_passed`; a Dagster check calls `load_gate`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from fxassets.core.atomic import write_json
from fxassets.core.config import Params, QualityConfig
from fxassets.pairs.quality import SAME_FACE, near_duplicates
from fxassets.pairs.skin_tones import MONK_HEX, SKIN_GROUPS

GATE_FILE = "gate.json"
DOCS_DIR = "gx_docs"
# the validation runs' time in the Data Docs (their folders are named by it): fixed, so that a rerun on the same
# pairs writes the same bytes (when the stage last ran is in its run log, fxassets.core.runlog)
DOCS_RUN_TIME = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_CLOCK = re.compile(r"\b\d{8}T\d{6}\.\d{6}Z\b")
_CACHE_BUSTER = re.compile(r"\?d=\d{8}T\d{6}\.\d{6}Z")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
BALANCE_CSV = "balance.csv"
BALANCE_PNG = "balance.png"


class GateError(ValueError):
    """The quality gate failed (or never ran); the message is the gate's readable summary."""


@dataclass(frozen=True)
class RowCheck:
    name: str
    column: str
    label: str
    low: str | None = None  # QualityConfig field of the lower bound
    high: str | None = None  # ... of the upper bound

    def bounds(self, q: QualityConfig) -> tuple[float | None, float | None]:
        return (getattr(q, self.low) if self.low else None, getattr(q, self.high) if self.high else None)

    def rule(self, q: QualityConfig) -> str:
        lo, hi = self.bounds(q)
        if lo is not None and hi is not None:
            return f"{self.label} outside {lo:g}..{hi:g}"
        return f"{self.label} < {lo:g}" if lo is not None else f"{self.label} > {hi:g}"

    def reason(self, q: QualityConfig, value: float) -> str:
        lo, hi = self.bounds(q)
        if lo is not None and value < lo:
            return f"{self.label} {value:.3g} < {lo:g}"
        return f"{self.label} {value:.3g} > {hi:g}"


# in the order reasons are listed; the first failed check names a rejection in summary.json
ROW_CHECKS = (
    RowCheck("source_detection", "det_score", "source detection score", low="min_source_det_score"),
    RowCheck("target_detection", "target_det_score", "teacher output detection score", low="min_target_det_score"),
    RowCheck("landmark_drift", "landmark_drift", "landmark drift", high="max_landmark_drift"),
    RowCheck("identity", "identity_distance", "identity distance", high="max_identity_distance"),
    RowCheck("source_sharpness", "source_sharpness", "source sharpness", low="min_source_sharpness"),
    RowCheck("sharpness", "sharpness_ratio", "sharpness ratio target/source", low="min_sharpness_ratio"),
    RowCheck("source_exposure", "source_exposure", "source exposure", low="min_exposure", high="max_exposure"),
    RowCheck("target_exposure", "target_exposure", "teacher output exposure", low="min_exposure", high="max_exposure"),
    RowCheck("source_clipping", "source_clipped", "source clipped share", high="max_source_clipped"),
    RowCheck("target_clipping", "target_clipped", "teacher output clipped share", high="max_target_clipped"),
)
GATE_COLUMNS = ["duplicate_of", "duplicate_distance", "failed_checks"]


def quality_for(params: Params, effect: str) -> QualityConfig:
    """The `quality:` section with the effect's own overrides (`effects.E.quality`) applied."""
    return params.quality_for(effect)


def mark_duplicates(df: pd.DataFrame, max_distance: int,
                    face_distance: Callable[[str, str], float] | None = None) -> pd.DataFrame:
    """`duplicate_of` (the first sample it near-duplicates) and `duplicate_distance`, over the measured pairs.
    `face_distance(sample_a, sample_b)`: the descriptor distance of two samples' source faces; with it a hash
    match counts only below `SAME_FACE` (one face under two person ids, not two look-alike crops)."""
    df = df.copy()
    hashes = [int(h, 16) if isinstance(h, str) and h else None for h in df["phash"]]
    ids = df["sample_id"].tolist()
    confirm = None if face_distance is None else (lambda i, j: face_distance(ids[i], ids[j]) < SAME_FACE)
    dups = near_duplicates(hashes, max_distance, df["person_id"].astype(str).tolist(), confirm)
    df["duplicate_of"] = [ids[d[0]] if d else None for d in dups]
    df["duplicate_distance"] = [float(d[1]) if d else float("nan") for d in dups]
    return df


# ---- GX --------------------------------------------------------------------------------------------------------
def _context(docs_dir: Path) -> Any:
    """An in-memory GX context whose only Data Docs site is `docs_dir`; no analytics, no progress bars."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    site = {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={"face_pairs": site},
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _validate(context: Any, asset: str, suite_name: str, expectations: list[Any], df: pd.DataFrame, index: str) -> Any:
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    source = context.data_sources.add_or_update_pandas("face_pairs")
    batch = source.add_dataframe_asset(asset).add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(gx.ExpectationSuite(suite_name))
    for e in expectations:
        suite.add_expectation(e)
    vd = context.validation_definitions.add(gx.ValidationDefinition(name=suite_name, data=batch, suite=suite))
    fmt = {"result_format": "COMPLETE", "unexpected_index_column_names": [index]}
    return vd.run(batch_parameters={"dataframe": df}, result_format=fmt,
                  run_id=RunIdentifier(run_name="face_pairs", run_time=DOCS_RUN_TIME))


def _scrub_docs(docs_dir: Path) -> None:
    """The Data Docs as a function of the validation results alone: GX stamps the clock on its pages (a `?d=`
    cache-buster on each logo URL, the batch's load time) and gives collapsible blocks random ids; the stamps
    become DOCS_RUN_TIME, the ids a count in page order."""
    stamp = DOCS_RUN_TIME.strftime("%Y%m%dT%H%M%S.%fZ")
    for page in sorted(Path(docs_dir).rglob("*.html")):
        ids: dict[str, str] = {}
        text = _CACHE_BUSTER.sub("", page.read_text(encoding="utf-8"))
        text = _UUID.sub(lambda m: ids.setdefault(m.group(), f"block{len(ids)}"), _CLOCK.sub(stamp, text))
        page.write_text(text, encoding="utf-8")


def _row_expectations(q: QualityConfig) -> list[Any]:
    import great_expectations.expectations as gxe

    out = []
    for c in ROW_CHECKS:
        lo, hi = c.bounds(q)
        out.append(gxe.ExpectColumnValuesToBeBetween(column=c.column, min_value=lo, max_value=hi, meta={"check": c.name, "rule": c.rule(q)}))
    out.append(gxe.ExpectColumnValuesToBeNull(column="duplicate_of", meta={"check": "duplicate", "rule": f"near-duplicate (phash distance <= {q.max_phash_distance}, one face to dlib: < {SAME_FACE})"}))
    return out


def _set_expectations(q: QualityConfig) -> list[Any]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, meta={"check": "pairs", "rule": "at least one pair"}),
        gxe.ExpectColumnValuesToBeInSet(column="status", value_set=["pass"], mostly=q.min_pass_rate,
                                        meta={"check": "pass_rate", "rule": f"pass rate >= {q.min_pass_rate:g}"}),
        gxe.ExpectColumnValuesToBeNull(column="duplicate_of", mostly=1.0 - q.max_duplicate_share,
                                       meta={"check": "duplicates", "rule": f"near-duplicate share <= {q.max_duplicate_share:g}"}),
        gxe.ExpectColumnValuesToBeBetween(column="identity_distance", max_value=q.max_identity_distance, mostly=q.min_identity_share,
                                          meta={"check": "identity_share", "rule": f"share of pairs with identity distance <= {q.max_identity_distance:g} >= {q.min_identity_share:g}"}),
    ]


def _balance_expectations(q: QualityConfig) -> list[Any]:
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnValuesToBeBetween(column="share", min_value=q.min_group_share,
                                              meta={"check": "balance", "rule": f"every skin-tone group >= {q.min_group_share:g} of the kept pairs"})]


def _set_result(r: Any, q: QualityConfig) -> dict[str, Any]:
    """One set-level expectation result as {check, passed, observed, threshold, rule, expectation}."""
    check, res = r.expectation_config.meta["check"], r.result
    kw = r.expectation_config.kwargs
    if check == "pairs":
        observed, threshold = res.get("observed_value"), 1
    elif check == "balance":
        observed, threshold = None, q.min_group_share  # filled in by the caller (the smallest group share)
    else:
        share_bad = (res.get("unexpected_percent") or 0.0) / 100.0
        observed = round(share_bad if check == "duplicates" else 1.0 - share_bad, 4)
        threshold = kw.get("mostly", 1.0)
        if check == "duplicates":
            threshold = round(1.0 - threshold, 4)
    return {"check": check, "passed": bool(r.success), "observed": observed, "threshold": threshold,
            "rule": r.expectation_config.meta["rule"], "expectation": r.expectation_config.type}


def _row_rejections(results: list[Any], df: pd.DataFrame, q: QualityConfig) -> tuple[dict[str, list[tuple[str, str]]], list[dict[str, Any]]]:
    """From the row suite's results: sample_id -> [(check, reason)] in ROW_CHECKS order, and a count per check."""
    by_check = {c.name: c for c in ROW_CHECKS}
    dup_distance = dict(zip(df["sample_id"], df["duplicate_distance"]))
    reasons: dict[str, list[tuple[str, str]]] = {}
    counts = []
    for r in results:
        name, failed = r.expectation_config.meta["check"], r.result.get("unexpected_index_list") or []
        c = by_check.get(name)
        for item in failed:
            if c is None:  # the near-duplicate check
                text = f"near-duplicate of {item['duplicate_of']} (phash distance {dup_distance[item['sample_id']]:.0f} <= {q.max_phash_distance})"
            else:
                text = c.reason(q, float(item[c.column]))
            reasons.setdefault(item["sample_id"], []).append((name, text))
        lo, hi = c.bounds(q) if c else (None, None)
        counts.append({"check": name, "column": c.column if c else "duplicate_of", "min": lo, "max": hi,
                       "rule": r.expectation_config.meta["rule"], "rejected": len(failed)})
    order = [c.name for c in ROW_CHECKS] + ["duplicate"]
    return {sid: sorted(v, key=lambda ct: order.index(ct[0])) for sid, v in reasons.items()}, counts


# ---- balance -------------------------------------------------------------------------------------------------
def balance_table(df: pd.DataFrame, q: QualityConfig) -> pd.DataFrame:
    """Kept pairs per estimated skin-tone group (checked when `balance`), per Monk tone and per gender (shown)."""
    kept = df[df["status"] == "pass"]
    n = max(1, len(kept))
    rows = []
    for g, tones in SKIN_GROUPS.items():
        c = int((kept["skin_group"] == g).sum())
        rows.append({"attribute": "skin_group", "group": g, "monk_tones": f"{tones[0]}-{tones[-1]}", "pairs": c, "share": round(c / n, 4),
                     "min_share": q.min_group_share if q.balance else float("nan")})
    for t in range(1, 11):
        c = int((kept["skin_tone"] == t).sum())
        rows.append({"attribute": "skin_tone", "group": f"monk_{t}", "monk_tones": str(t), "pairs": c, "share": round(c / n, 4), "min_share": float("nan")})
    if "gender" in kept and kept["gender"].notna().any():
        for g, c in sorted(Counter(kept["gender"].fillna("unknown")).items()):
            rows.append({"attribute": "gender", "group": str(g), "monk_tones": "", "pairs": int(c), "share": round(c / n, 4), "min_share": float("nan")})
    return pd.DataFrame(rows)


def plot_balance(table: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attrs = [a for a in ("skin_group", "skin_tone", "gender") if (table["attribute"] == a).any()]
    fig, axes = plt.subplots(1, len(attrs), figsize=(4.2 * len(attrs), 3.4), squeeze=False)
    colors = {f"monk_{t}": f"#{h}" for t, h in enumerate(MONK_HEX, 1)}  # the Monk swatches themselves
    colors.update({g: f"#{MONK_HEX[ts[len(ts) // 2]-1]}" for g, ts in SKIN_GROUPS.items()})
    for ax, attr in zip(axes[0], attrs):
        t = table[table["attribute"] == attr]
        labels = [s.replace("monk_", "") for s in t["group"]]
        col = [colors.get(g, "#8888aa") for g in t["group"]]
        ax.bar(labels, t["share"], color=col, edgecolor="black", linewidth=0.5)
        for x, (s, c) in enumerate(zip(t["share"], t["pairs"])):
            ax.text(x, s, str(c), ha="center", va="bottom", fontsize=8)
        if attr == "skin_group" and t["min_share"].notna().any():
            ax.axhline(float(t["min_share"].iloc[0]), color="red", linestyle="--", linewidth=1, label="min share")
            ax.legend(fontsize=8)
        ax.set_title({"skin_group": "skin-tone group (estimated)", "skin_tone": "Monk tone (estimated)", "gender": "gender (source)"}[attr], fontsize=9)
        ax.set_ylabel("share of kept pairs")
        ax.set_ylim(0, 1.05)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the gate ----------------------------------------------------------------------------------------------------
class _Failures(logging.Handler):
    """What GX's Data Docs builder logs as an error: it logs a page it could not write (a full disk) and carries on."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _build_docs(context: Any, docs_dir: Path) -> None:
    """Build the Data Docs; a page GX could not write is an OSError naming the folder, not a logged traceback and
    a half-written site."""
    log, failures = logging.getLogger("great_expectations"), _Failures()
    log.addHandler(failures)
    log.propagate = False
    try:
        context.build_data_docs()
    except OSError as exc:  # the index page: raised, without a file name
        failures.messages.append(str(exc))
    finally:
        log.removeHandler(failures)
        log.propagate = True
    if failures.messages:
        m = re.search(r"\[Errno (\d+)\] ([^\"'\n]+)", "\n".join(failures.messages))
        raise OSError(int(m[1]), m[2], str(docs_dir)) if m else OSError(
            f"{docs_dir}: great-expectations could not build the Data Docs: {failures.messages[0].splitlines()[0]}")


def run_gate(df: pd.DataFrame, q: QualityConfig, out_dir: Path, title: str = "face pairs",
             face_distance: Callable[[str, str], float] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Validate the manifest `df` (measured by face_pairs), reject failing pairs, judge the set; write gate.json,
    the Data Docs and the balance report into `out_dir`. Returns the updated manifest and the gate dict.
    `face_distance`: see `mark_duplicates`."""
    out_dir = Path(out_dir)
    df = mark_duplicates(df, q.max_phash_distance, face_distance)
    context = _context(out_dir / DOCS_DIR)

    # row level: every failed expectation rejects its pairs, with the value in the reason
    rows = _validate(context, "manifest", "pair_rows", _row_expectations(q), df, "sample_id")
    reasons, row_checks = _row_rejections(rows.results, df, q)
    df["failed_checks"] = df["failed_checks"].fillna("") if "failed_checks" in df else ""
    for i in df.index[df["status"] == "pass"]:
        found = reasons.get(df.at[i, "sample_id"])
        if found:
            df.loc[i, ["status", "reason", "failed_checks"]] = ["reject", "; ".join(t for _, t in found), ",".join(c for c, _ in found)]

    # set level, on the manifest after the rejections (and on the balance table)
    table = balance_table(df, q)
    results = [_set_result(r, q) for r in _validate(context, "manifest_gated", "pair_set", _set_expectations(q), df, "sample_id").results]
    if q.balance:
        groups = table[table["attribute"] == "skin_group"].reset_index(drop=True)
        res = _validate(context, "balance", "pair_balance", _balance_expectations(q), groups, "group").results[0]
        entry = _set_result(res, q)
        entry["observed"] = float(groups["share"].min())
        entry["groups"] = {g: float(s) for g, s in zip(groups["group"], groups["share"])}
        results.append(entry)
    _build_docs(context, out_dir / DOCS_DIR)
    _scrub_docs(out_dir / DOCS_DIR)
    table.to_csv(out_dir / BALANCE_CSV, index=False)
    plot_balance(table, out_dir / BALANCE_PNG, title)

    kept = int((df["status"] == "pass").sum())
    gate = {
        "passed": all(r["passed"] for r in results),
        "pairs": int(len(df)), "kept": kept, "rejected": int(len(df) - kept),
        "set_checks": results,
        "row_checks": row_checks,
        "rejected_by_check": dict(Counter(c for fc in df["failed_checks"] for c in fc.split(",") if c)),
        "balance": table[table["attribute"] == "skin_group"][["group", "monk_tones", "pairs", "share"]].to_dict("records"),
        "thresholds": q.model_dump(),
        "docs": f"{DOCS_DIR}/index.html",
    }
    gate["summary"] = summary_text(gate, title)
    write_json(out_dir / GATE_FILE, gate)
    return df, gate


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def summary_text(gate: dict[str, Any], title: str = "face pairs") -> str:
    """The gate in a few readable lines (what `require_passed` raises and the Dagster check shows)."""
    lines = [f"quality gate {'passed' if gate['passed'] else 'FAILED'} for {title}: {gate['kept']} of {gate['pairs']} pairs kept"]
    for r in gate["set_checks"]:
        mark = "ok  " if r["passed"] else "FAIL"
        lines.append(f"  {mark} {r['check']}: {_fmt(r['observed'])} (rule: {r['rule']})")
    if gate["rejected_by_check"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(gate["rejected_by_check"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  rejected pairs by check: {counts}")
    lines.append(f"  details: {gate['docs']} (great-expectations Data Docs), manifest.parquet (reason per pair)")
    return "\n".join(lines)


def load_gate(pairs_dir: str | Path) -> dict[str, Any]:
    """gate.json of a face_pairs folder, with absolute `gate_path` and `docs_path`; GateError when missing."""
    pairs_dir = Path(pairs_dir)
    path = pairs_dir / GATE_FILE
    try:
        gate = json.loads(path.read_text())
    except FileNotFoundError:
        raise GateError(f"{path}: no quality gate result; run the face_pairs stage first") from None
    except json.JSONDecodeError as exc:
        raise GateError(f"{path}: unreadable quality gate result ({exc})") from exc
    gate["gate_path"] = str(path.resolve())
    gate["docs_path"] = str((pairs_dir / gate.get("docs", f"{DOCS_DIR}/index.html")).resolve())
    return gate


def require_passed(pairs_dir: str | Path) -> dict[str, Any]:
    """Raise GateError with the gate's summary unless the face_pairs quality gate passed; else return it."""
    gate = load_gate(pairs_dir)
    if not gate.get("passed"):
        summary = gate.get("summary") or summary_text(gate)
        raise GateError(f"{Path(pairs_dir) / GATE_FILE}: training blocked by the pair quality gate\n{summary}\n  docs: {gate['docs_path']}")
    return gate

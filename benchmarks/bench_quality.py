"""Cost of the pair quality metrics, one thread, per aligned 256 px pair, and of the great-expectations gate.

    python benchmarks/bench_quality.py [--effect cartoon] [--n 20] [--json results.json]

Reads the aligned pairs of data/face_pairs/EFFECT (run the face_pairs stage first). Per pair: crop detection
(BlazeFace on source and target, for the detection score and landmark drift), identity (dlib 5-point shape +
two ResNet descriptors), and the cheap image statistics (sharpness, exposure, perceptual hash, skin tone). The gate
(GX suites + Data Docs + balance report) is timed once on the effect's whole manifest.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from fxassets.pairs import quality as qm  # noqa: E402
from fxassets.core.atomic import write_json  # noqa: E402
from fxassets.core.config import load_params  # noqa: E402
from fxassets.faces.detect import FaceDetector  # noqa: E402
from fxassets.pairs.gate import quality_for, run_gate  # noqa: E402
from fxassets.core.images import read_png_rgb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--effect", default="cartoon")
    ap.add_argument("--n", type=int, default=20, help="pairs to time")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    params = load_params(REPO / "params.yaml")
    pairs = REPO / "data" / "face_pairs" / args.effect
    manifest = pd.read_parquet(pairs / "manifest.parquet")
    rows = manifest[manifest.source != ""].head(args.n)
    crops = [(read_png_rgb(pairs / r.source), read_png_rgb(pairs / r.target)) for r in rows.itertuples()]
    size, margin = params.faces.crop_size, params.faces.margin

    t = {"detection": 0.0, "identity": 0.0, "image_stats": 0.0, "measure_total": 0.0}
    with FaceDetector("short", qm.CROP_MIN_SCORE) as det:
        meter = qm.PairMeter(det, size, margin)
        region = qm.face_region(size, margin)
        meter.measure(*crops[0])  # warm-up
        for s, g in crops:
            t0 = time.perf_counter()
            qm.detect_crop(det, s), qm.detect_crop(det, g)
            t1 = time.perf_counter()
            meter.identity.distance(s, g)
            t2 = time.perf_counter()
            qm.sharpness(s, region), qm.sharpness(g, region), qm.exposure(s, region), qm.exposure(g, region)
            qm.phash(s), qm.monk_tone(qm.skin_ita(s, size, margin))
            t3 = time.perf_counter()
            meter.measure(s, g)
            t4 = time.perf_counter()
            t["detection"] += t1 - t0
            t["identity"] += t2 - t1
            t["image_stats"] += t3 - t2
            t["measure_total"] += t4 - t3
    per_pair = {k: round(v / len(crops), 4) for k, v in t.items()}

    base = manifest.drop(columns=["duplicate_of", "duplicate_distance"], errors="ignore").copy()
    base.loc[base.failed_checks != "input", ["status", "reason", "failed_checks"]] = ["pass", "", ""]
    base.loc[base.failed_checks == "face_detection", "status"] = "reject"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _, gate = run_gate(base, quality_for(params, args.effect), Path(tmp))
        gate_s = time.perf_counter() - t0
    result = {"effect": args.effect, "pairs_timed": len(crops), "seconds_per_pair": per_pair,
              "gate_seconds": round(gate_s, 2), "gate_pairs": int(len(base)), "gate_passed": gate["passed"]}
    print(result)
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()

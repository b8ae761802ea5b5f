"""The API teachers against the fake Vertex AI / Gemini API / OpenAI server of tests/test_api_teachers.py (127.0.0.1,
no network).

    python benchmarks/bench_api_teachers.py [--n 24] [--reps 40] [--out benchmarks/results/bench_api_teachers.json]

Measures:
- kill and resume: a `gemini-image` teacher stage (Vertex AI) on --n faces is killed (SIGKILL) once half the images have arrived, then
  run again; the server counts requests and answers per sample. Figure: answered requests per finished sample (must
  be 1: nobody pays twice) and all requests sent per finished sample (the ones in flight at the kill are lost);
- client overhead per request: one edit through the teacher (PNG encode, base64, JSON, the retry loop, the ledger,
  the write-ahead response cache, decode, resize) against the same request sent with a bare `requests.post` of a
  prebuilt body, both at concurrency 1 to the same instant fake server, at 256 and 512 px (gemini-image, Vertex AI)
  and 512 px (openai-images, multipart); and throughput at concurrency 1 vs 4 when each answer takes 50 ms.
The fake server's own work (decoding the upload, encoding its answer) is in both sides of the overhead figure."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_api_teachers import GKEY, KEY, KILLED_RUN, TOKEN, FakeApis, cached_images, project  # noqa: E402


def _env() -> None:
    os.environ.pop("FXASSETS_CACHE", None)
    os.environ["GOOGLE_OAUTH_ACCESS_TOKEN"] = TOKEN
    os.environ["GEMINI_API_KEY"] = GKEY
    os.environ["OPENAI_API_KEY"] = KEY


def _teacher(kind: str, url: str, **kw) -> dict:
    if kind == "openai-images":
        return {"kind": kind, "endpoint": url + "/v1", "price_per_image": 0.04, **kw}
    return {"kind": kind, "project": "p", "endpoint": url, **kw}


def bench_kill_resume(n: int) -> dict:
    from fxassets.stages import run_stage

    api = FakeApis()
    try:
        with tempfile.TemporaryDirectory() as d:
            teacher = _teacher("gemini-image", api.url, concurrency=2, backoff=0.01)
            root, params = project(Path(d), teacher, n=n)
            half = n // 2
            api.hold_after = half
            proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(root), params.model_dump_json()], stderr=subprocess.DEVNULL)
            responses = root / ".cache/fxassets/api"
            deadline = time.time() + 120
            while len(cached_images(responses)) < half and time.time() < deadline and proc.poll() is None:
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            before = len(api.requests)
            finished_before = set(api.answered)
            api.hold_after = None
            api.release.set()
            t0 = time.perf_counter()
            s = run_stage("teacher_images", params, "fx", root, progress=False)
            resume_s = time.perf_counter() - t0
            again = Counter(r["sample"] for r in api.requests[before:])
            return {
                "samples": n, "finished_before_kill": len(finished_before), "requests_before_kill": before,
                "requests_after_resume": len(api.requests) - before, "ok": s["ok"],
                "finished_samples_requested_again": len(finished_before & set(again)),
                "answered_requests_per_finished_sample": round(sum(api.answered.values()) / max(1, s["ok"]), 3),
                "max_answers_for_one_sample": max(api.answered.values()),
                "all_requests_per_finished_sample": round(len(api.requests) / max(1, s["ok"]), 3),
                "resume_seconds": round(resume_s, 3),
            }
    finally:
        api.close()


def bench_overhead(kind: str, side: int, reps: int) -> dict:
    import requests

    from fxassets.teachers import make_teacher

    api = FakeApis()
    try:
        with tempfile.TemporaryDirectory() as d:
            size = {"size": f"{side}x{side}"} if kind == "openai-images" else {}
            root, params = project(Path(d), _teacher(kind, api.url, concurrency=1, **size), n=1, px=side)
            src = cv2.cvtColor(cv2.imread(str(next((root / "faces").glob("*.png")))), cv2.COLOR_BGR2RGB)
            teacher = make_teacher(params.teacher, root=root)
            rec = {"prompt": "a cartoon", "seed": 0}
            teacher.edit_batch([src], [{**rec, "seed": -1}])  # warm: pool, session, imports
            t0 = time.perf_counter()
            for i in range(reps):  # each a new request (OpenAI's takes no seed: the prompt differs too)
                out = teacher.edit_batch([src], [{"prompt": f"a cartoon {i}", "seed": i}])[0]
            ours = (time.perf_counter() - t0) / reps
            assert isinstance(out, np.ndarray) and len(api.requests) == reps + 1
            req = teacher.edit_request(src, rec).req
            url = teacher.base_url() + req.path
            sess = requests.Session()
            kw = {"headers": teacher.auth_headers(False), "json": req.json_body, "data": req.fields, "files": req.files}
            sess.post(url, **kw).json()
            t0 = time.perf_counter()
            for _ in range(reps):
                r = sess.post(url, **kw)
                r.json()
            bare = (time.perf_counter() - t0) / reps
            teacher.close()
            return {"teacher": kind, "side_px": side, "reps": reps, "teacher_ms_per_request": round(1000 * ours, 2),
                    "bare_requests_ms_per_request": round(1000 * bare, 2), "client_overhead_ms_per_request": round(1000 * (ours - bare), 2)}
    finally:
        api.close()


def bench_concurrency(n: int) -> dict:
    from fxassets.teachers import make_teacher

    out = {}
    api = FakeApis()
    api.delay = 0.05
    try:
        with tempfile.TemporaryDirectory() as d:
            root, params = project(Path(d), _teacher("gemini-image", api.url), n=1)
            src = cv2.cvtColor(cv2.imread(str(next((root / "faces").glob("*.png")))), cv2.COLOR_BGR2RGB)
            for c in (1, 4):
                teacher = make_teacher(params.teacher.model_copy(update={"concurrency": c}), root=root)
                recs = [{"prompt": f"c{c}", "seed": i} for i in range(n)]
                t0 = time.perf_counter()
                teacher.edit_batch([src] * n, recs)
                out[f"concurrency_{c}_images_per_s"] = round(n / (time.perf_counter() - t0), 2)
                teacher.close()
            out["max_in_flight_seen"] = api.max_in_flight
    finally:
        api.close()
    return {"answer_delay_s": 0.05, "images": n, **out}


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="faces in the kill-and-resume run")
    ap.add_argument("--reps", type=int, default=40, help="requests per overhead measurement")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_api_teachers.json"))
    args = ap.parse_args(argv)
    _env()
    res = {
        "cpus": os.cpu_count(),
        "kill_resume": bench_kill_resume(args.n),
        "cpu": _cpu_name(),
        "overhead": [bench_overhead(k, s, args.reps) for k, s in (("gemini-image", 256), ("gemini-image", 512), ("openai-images", 512))],
        "concurrency": bench_concurrency(args.n),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

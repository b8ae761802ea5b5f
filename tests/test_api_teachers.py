"""Teachers behind an API (`gemini-image` on Vertex AI and the Gemini API, `openai-images`) against a fake server on
127.0.0.1 that speaks each API's documented request and answer shapes, and the `latent-edit` GAN teacher with a tiny
random generator made here.

The fake server checks the request bodies (prompt, seed, inline source image, response modalities, image config,
multipart fields) and the credential headers, counts requests per sample, and can answer 429 / 5xx / 404 first,
refuse (a blocked prompt, a safety finish reason, text without an image, OpenAI's moderation), hold requests, or
answer slowly."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from fxassets.core.atomic import read_jsonl
from fxassets.core.config import ConfigError, Params, load_params
from fxassets.core.images import read_png_rgb
from fxassets.core.paths import EffectPaths
from fxassets.stages import run_stage
from fxassets.teachers import make_teacher
from fxassets.teachers.api.client import ApiClient, ApiError, BudgetExceeded, CredentialsError, Ledger, parse_retry_after

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples" / "faces"
TOKEN = "ya29.test-token-never-written"
GKEY = "AIza-test-gemini-key-never-written"
KEY = "sk-test-key-never-written"
VERTEX = re.compile(r"^/v1/projects/([^/]+)/locations/([^/]+)/publishers/google/models/([^/:]+):generateContent$")
GEMINI_API = re.compile(r"^/v1beta/models/([^/:]+):generateContent$")
ASPECTS = {"1:1": 1, "2:3": 2 / 3, "3:2": 1.5, "3:4": 0.75, "4:3": 4 / 3, "4:5": 0.8, "5:4": 1.25, "9:16": 9 / 16, "16:9": 16 / 9, "21:9": 21 / 9}


# -- the fake APIs -------------------------------------------------------------------------------------------------


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def _b64png(rgb: np.ndarray) -> str:
    return base64.b64encode(_png(rgb)).decode()


def _decode(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None, "the source image is not an image"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def edited(rgb: np.ndarray) -> np.ndarray:
    """What the fake API does to a source: inverts it."""
    return 255 - rgb


def generated(seed: int, side: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.full((side, side, 3), rng.integers(0, 256, 3), np.uint8)


def parse_multipart(ctype: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes, str]]]:
    msg = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
    assert msg.is_multipart(), "not a multipart body"
    fields, files = {}, {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True)
        if part.get_filename():
            files[name] = (part.get_filename(), data, part.get_content_type())
        else:
            fields[name] = data.decode()
    return fields, files


# Gemini answers that are not an image (documented shapes: promptFeedback.blockReason, a finishReason, text only)
GOOGLE_REFUSALS = {
    "blocked": {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT", "blockReasonMessage": "The prompt was blocked (fake)."},
                "usageMetadata": {"promptTokenCount": 270, "totalTokenCount": 270}},
    "IMAGE_SAFETY": {"candidates": [{"finishReason": "IMAGE_SAFETY", "finishMessage": "Unable to show the generated image (fake).",
                                     "safetyRatings": [{"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "HIGH", "blocked": True}]}]},
    "text": {"candidates": [{"content": {"role": "model", "parts": [{"text": "I can't edit photos of this person."}]}, "finishReason": "STOP"}]},
}


class FakeApis(ThreadingHTTPServer):
    """Vertex AI and the Gemini API `:generateContent`, OpenAI `/v1/images/{edits,generations}` on 127.0.0.1, in a
    thread."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # one per request: path, sample, status, body fields
        self.faults: list[tuple[int, dict, dict]] = []  # answered first, in order: (status, headers, json)
        self.refuse = lambda req: None  # -> a GOOGLE_REFUSALS key (Google) / anything truthy (OpenAI): refuse it
        self.delay = 0.0
        self.hold_after: int | None = None  # answer this many, then hold the rest until `release`
        self.admitted = 0  # requests let through to be answered (for hold_after)
        self.release = threading.Event()
        self.answered: Counter = Counter()  # sample -> 2xx answers
        self.in_flight = self.max_in_flight = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FakeApis

    def log_message(self, *a):  # quiet
        pass

    def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client was killed
            pass

    def do_POST(self):  # noqa: N802
        srv = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with srv.lock:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            self._handle(srv, body)
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _handle(self, srv: FakeApis, body: bytes) -> None:
        req: dict = {"path": self.path, "authorization": self.headers.get("Authorization"), "api_key": self.headers.get("x-goog-api-key")}
        try:
            self._parse(req, body)
        except AssertionError as exc:  # a request that breaks the documented shape: fail loudly
            with srv.lock:
                srv.requests.append({**req, "status": 400, "bad": str(exc)})
            return self._send(400, {"error": {"code": 400, "message": f"fake server: bad request: {exc}", "status": "INVALID_ARGUMENT"}})
        with srv.lock:
            srv.requests.append(req)
            fault = srv.faults.pop(0) if srv.faults else None
            hold = srv.hold_after is not None and srv.admitted >= srv.hold_after
            srv.admitted += not hold and not fault
        key_api = req["api"] == "gemini-api"  # the Gemini API takes its key in x-goog-api-key, the others a bearer token
        if (req["api_key"], req["authorization"]) != ((req["want_auth"], None) if key_api else (None, f"Bearer {req['want_auth']}")):
            req["status"] = 401
            return self._send(401, {"error": {"code": 401, "message": "Request had invalid authentication credentials.", "status": "UNAUTHENTICATED"}})
        if fault:
            req["status"] = fault[0]
            return self._send(fault[0], fault[2], fault[1])
        if hold:  # held until the client is gone: never answered
            srv.release.wait(60)
            req["status"] = "dropped"
            return None
        if srv.delay:
            time.sleep(srv.delay)
        if refusal := srv.refuse(req):
            req["status"] = "refused"
            if req["api"] == "openai":
                return self._send(400, {"error": {"code": "moderation_blocked", "type": "image_generation_user_error", "param": None,
                                                  "message": "Your request was rejected by the safety system."}})
            return self._send(200, GOOGLE_REFUSALS[refusal])
        with srv.lock:
            srv.answered[req["sample"]] += 1
        req["status"] = 200
        if req["api"] == "openai":
            out = edited(req["image"]) if "image" in req else generated(0)
            if req.get("size") and req["size"] != "auto":
                w, h = (int(x) for x in req["size"].split("x"))
                out = cv2.resize(out, (w, h), interpolation=cv2.INTER_NEAREST)
            return self._send(200, {"created": 1700000000, "data": [{"b64_json": _b64png(out)}], "usage": {"total_tokens": 1}})
        # Gemini: the model answers at its own resolution (here twice the source's), a thought image first
        out = cv2.resize(edited(req["image"]), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST) if "image" in req else generated(req["seed"])
        parts = [{"inlineData": {"mimeType": "image/png", "data": _b64png(np.zeros((8, 8, 3), np.uint8))}, "thought": True},
                 {"text": "Here is the edited photo."}, {"inlineData": {"mimeType": "image/png", "data": _b64png(out)}}]
        return self._send(200, {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
                                "usageMetadata": {"promptTokenCount": 560, "candidatesTokenCount": 1120}, "modelVersion": req["model"]})

    def _parse(self, req: dict, body: bytes) -> None:
        if m := VERTEX.match(self.path):
            req.update(api="vertex-ai", project=m[1], location=m[2], model=m[3], want_auth=TOKEN)
        elif m := GEMINI_API.match(self.path):
            req.update(api="gemini-api", model=m[1], want_auth=GKEY)
        else:
            return self._parse_openai(req, body)
        b = json.loads(body)
        assert isinstance(b.get("contents"), list) and len(b["contents"]) == 1 and b["contents"][0].get("role") == "user", "one user turn"
        parts = b["contents"][0]["parts"]
        texts = [p["text"] for p in parts if "text" in p]
        images = [p["inlineData"] for p in parts if "inlineData" in p]
        assert len(texts) == 1 and texts[0] and len(texts) + len(images) == len(parts), f"one text part and the source: {parts!r:.200}"
        gc = b.get("generationConfig", {})
        assert gc.get("responseModalities") == ["IMAGE"], f"responseModalities {gc.get('responseModalities')!r}"
        assert gc.get("imageConfig", {}).get("aspectRatio") in ASPECTS, f"imageConfig {gc.get('imageConfig')!r}"
        assert isinstance(gc.get("seed"), int) and 0 <= gc["seed"] < 2**31, f"seed {gc.get('seed')!r}"
        req.update(prompt=texts[0], seed=gc["seed"], config=gc, safety=b.get("safetySettings"))
        if images:
            assert len(images) == 1 and images[0]["mimeType"] == "image/png", "one inline PNG source"
            data = base64.b64decode(images[0]["data"])
            req["image"] = _decode(data)
            h, w = req["image"].shape[:2]
            assert abs(w / h / ASPECTS[gc["imageConfig"]["aspectRatio"]] - 1) < 0.05, "the source is sent at the aspect ratio asked for"
            req["sample"] = hashlib.sha1(data).hexdigest()[:12]
        else:
            req["sample"] = f"{texts[0]}|{gc['seed']}"

    def _parse_openai(self, req: dict, body: bytes) -> None:
        req.update(api="openai", want_auth=KEY)
        if self.path == "/v1/images/edits":
            ctype = self.headers.get("Content-Type", "")
            assert ctype.startswith("multipart/form-data"), f"edits need multipart, got {ctype}"
            fields, files = parse_multipart(ctype, body)
            assert fields.get("prompt") and fields.get("model") and fields.get("n") == "1", fields
            assert list(files) == ["image[]"] and files["image[]"][2] == "image/png", list(files)
            req.update(prompt=fields["prompt"], model=fields["model"], size=fields.get("size"), fields=fields, seed=None)
            req["image"] = _decode(files["image[]"][1])
            req["sample"] = hashlib.sha1(files["image[]"][1]).hexdigest()[:12]
        elif self.path == "/v1/images/generations":
            b = json.loads(body)
            assert b.get("prompt") and b.get("model") and b.get("n") == 1, b
            req.update(prompt=b["prompt"], model=b["model"], size=b.get("size"), fields=b, seed=None, sample=b["prompt"])
        else:
            raise AssertionError(f"no such endpoint {self.path}")


@pytest.fixture
def api():
    srv = FakeApis()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("FXASSETS_CACHE", raising=False)
    monkeypatch.setenv("GOOGLE_OAUTH_ACCESS_TOKEN", TOKEN)
    monkeypatch.setenv("GEMINI_API_KEY", GKEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


FAST = {"backoff": 0.01, "max_backoff": 0.05, "timeout": 20, "concurrency": 2}


def gemini(url: str, **kw) -> dict:
    return {"kind": "gemini-image", "project": "proj", "endpoint": url, **FAST, **kw}


def openai(url: str, **kw) -> dict:
    return {"kind": "openai-images", "endpoint": url + "/v1", "size": "256x256", **FAST, **kw}


def project(tmp_path: Path, teacher: dict, n: int = 3, px: int | tuple[int, int] = 64, prompt: str = "a cartoon") -> tuple[Path, Params]:
    """`n` sample faces as PNGs of px x px (or (w, h)) and the prompts of one effect `fx`."""
    faces = tmp_path / "faces"
    faces.mkdir(parents=True, exist_ok=True)
    w, h = (px, px) if isinstance(px, int) else px
    for p in sorted(SAMPLES.glob("*.jpg"))[:n]:
        cv2.imwrite(str(faces / f"{p.stem}.png"), cv2.resize(cv2.imread(str(p)), (w, h), interpolation=cv2.INTER_AREA))
    params = Params.model_validate({"faces": {"source": "faces"}, "teacher": teacher,
                                    "effects": {"fx": {"prompt": prompt, "negative_prompt": "blurry", "seed": 7}}})
    run_stage("prompts", params, "fx", tmp_path, progress=False)
    return tmp_path, params


def records(root: Path) -> list[dict]:
    return read_jsonl(EffectPaths(root, "fx").teacher_records)


def sources(root: Path) -> dict[str, np.ndarray]:
    return {p.stem: read_png_rgb(p) for p in sorted((root / "faces").glob("*.png"))}


def cached_images(folder: Path) -> list[Path]:
    """The response cache's images (not the hidden temp file of one being written)."""
    return [p for p in folder.glob("*.img") if not p.name.startswith(".")]


def no_secret_written(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert not any(s.encode() in data for s in (TOKEN, GKEY, KEY)), f"{p} holds a credential"


# -- gemini-image ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["vertex-ai", "gemini-api"])
def test_gemini_sends_the_documented_request_and_caches_every_sample(tmp_path, api, service):
    api.delay = 0.4  # so that requests overlap, even on a busy machine
    root, params = project(tmp_path, gemini(api.url, service=service), n=4)
    s = run_stage("teacher_images", params, "fx", root, progress=False)
    assert s["ok"] == 4 and s["computed"] == 4 and s["runtime"]["api"] == service
    prompts = {r["sample_id"]: r for r in read_jsonl(EffectPaths(root, "fx").prompts)}
    assert len(api.requests) == 4 and api.max_in_flight == 2  # the concurrency limit, reached
    for req in api.requests:
        assert req["api"] == service and req["model"] == "gemini-3.1-flash-image" and req["status"] == 200
        if service == "vertex-ai":
            assert (req["project"], req["location"]) == ("proj", "global")
        assert req["prompt"] == "Edit this photo: a cartoon. Keep the person's identity, face shape, pose, expression and framing."
        assert req["config"]["imageConfig"] == {"aspectRatio": "1:1", "imageSize": "1K"} and req["safety"] is None
    by_seed = {req["seed"]: req for req in api.requests}
    src = sources(root)
    for rec in records(root):
        req = by_seed[prompts[rec["sample_id"]]["seed"]]  # the sample's own seed went out
        assert np.array_equal(req["image"], src[rec["sample_id"]])  # the source went out inline, lossless
        out = read_png_rgb(EffectPaths(root, "fx").teacher_dir / rec["image"])
        assert np.array_equal(out, edited(src[rec["sample_id"]]))  # the answer's image (not its thought), at the source's size
    # a rerun asks for nothing; the write-ahead response cache of a finished run is emptied
    s2 = run_stage("teacher_images", params, "fx", root, progress=False)
    assert len(api.requests) == 4 and s2["cached"] == 4
    assert not cached_images(root / ".cache/fxassets/api")
    no_secret_written(root)
    # the model id is in the teacher fingerprint, and so in the model card
    from fxassets.export.model_card import render_model_card
    from test_model_card import FILES, REPORT

    fp = json.loads((EffectPaths(root, "fx").teacher_dir / "teacher.json").read_text())
    card = render_model_card(effect="fx", report=REPORT, student=REPORT["student"], files=FILES, teacher=fp)
    assert fp["model"] == "gemini-3.1-flash-image" and "| `model` | `gemini-3.1-flash-image` |" in card


def test_gemini_pads_to_the_nearest_aspect_ratio_and_the_fingerprint(tmp_path, api):
    t = gemini(api.url, image_size="2K", safety_threshold="BLOCK_ONLY_HIGH", location="us-central1",
               prompt_template="Make the {gender} in this photo {prompt}")
    root, params = project(tmp_path, t, n=2, px=(64, 40))  # 1.6: nearest supported ratio 3:2
    assert run_stage("teacher_images", params, "fx", root, progress=False)["ok"] == 2
    src = sources(root)
    for req in api.requests:
        assert req["location"] == "us-central1" and req["prompt"] == "Make the  in this photo a cartoon"
        assert req["config"]["imageConfig"] == {"aspectRatio": "3:2", "imageSize": "2K"} and req["image"].shape == (43, 64, 3)
        assert {s["threshold"] for s in req["safety"]} == {"BLOCK_ONLY_HIGH"} and len(req["safety"]) == 4
    for rec in records(root):  # the padding cropped off again: the face where it was
        assert np.array_equal(read_png_rgb(EffectPaths(root, "fx").teacher_dir / rec["image"]), edited(src[rec["sample_id"]]))

    fp = lambda **kw: make_teacher(params.teacher.model_copy(update=kw), root=root).fingerprint()["hash"]  # noqa: E731
    base = fp()
    assert fp(model="gemini-3-pro-image") != base  # the model id is in the fingerprint
    assert fp(image_size="1K") != base and fp(safety_threshold=None) != base and fp(prompt_template="x {prompt}") != base
    for kw in ({"endpoint": "http://elsewhere"}, {"concurrency": 9}, {"price_per_image": 1.0}, {"max_cost": 1.0}, {"timeout": 5.0},
               {"service": "gemini-api"}, {"project": "other"}, {"location": "global"}, {"aspect_ratio": "3:4"}):
        assert fp(**kw) == base, kw
    gen = make_teacher(params.teacher, root=root).fingerprint("generate")
    assert gen["model"] == "gemini-3.1-flash-image" and gen["aspect_ratio"] == "1:1" and "prompt_template" not in gen


def test_gemini_generates_sources_from_params(tmp_path, api, monkeypatch):
    from fxassets.cli import main

    (tmp_path / "params.yaml").write_text(json.dumps({"teacher": gemini(api.url, aspect_ratio="3:4"), "effects": {"fx": {"prompt": "p"}}}))
    monkeypatch.chdir(tmp_path)
    rc = main(["--params", "params.yaml", "generate-sources", "--from-params", "--out", "gen", "--n", "3", "--no-progress"])
    assert rc == 0 and len(api.requests) == 3
    for req in api.requests:
        assert req["model"] == "gemini-3.1-flash-image" and "image" not in req and "year old" in req["prompt"]
        assert req["config"]["imageConfig"]["aspectRatio"] == "3:4" and isinstance(req["seed"], int)
    rows = read_jsonl(tmp_path / "gen" / "records.jsonl")
    assert all(r["status"] == "ok" for r in rows) and (tmp_path / "gen" / "manifest.csv").is_file()
    for r in rows:
        assert np.array_equal(read_png_rgb(tmp_path / "gen" / r["image"]), generated(r["seed"] % 2**31))
    assert main(["--params", "params.yaml", "generate-sources", "--from-params", "--out", "gen", "--n", "3", "--no-progress"]) == 0
    assert len(api.requests) == 3  # cached
    assert main(["--params", "params.yaml", "generate-sources", "--out", "gen", "--n", "3"]) == 2  # --model or --from-params


def test_refused_images_become_rejected_samples_with_their_reason(tmp_path, api):
    root, params = project(tmp_path, gemini(api.url), n=4)
    seeds = sorted(r["seed"] for r in read_jsonl(EffectPaths(root, "fx").prompts))
    modes = dict(zip(seeds, ["blocked", "IMAGE_SAFETY", "text"]))
    api.refuse = lambda req: modes.get(req.get("seed"))
    s = run_stage("teacher_images", params, "fx", root, progress=False)
    assert s["ok"] == 1
    reasons = {r["seed"]: r["reason"] for r in records(root) if r["status"] != "ok"}
    assert "blocked the prompt (PROHIBITED_CONTENT): The prompt was blocked" in reasons[seeds[0]]
    assert "finishReason IMAGE_SAFETY: Unable to show" in reasons[seeds[1]] and "HARM_CATEGORY_SEXUALLY_EXPLICIT" in reasons[seeds[1]]
    assert "no image, only text: \"I can't edit" in reasons[seeds[2]]
    run_stage("teacher_images", params, "fx", root, progress=False)
    assert len(api.requests) == 4  # a refusal is recorded, not asked again

    # OpenAI: a 400 moderation_blocked
    root2, params2 = project(tmp_path / "o", openai(api.url), n=2, prompt="REFUSE this")
    api.refuse = lambda req: "REFUSE" in req["prompt"]
    s = run_stage("teacher_images", params2, "fx", root2, progress=False)
    assert s["ok"] == 0 and all("moderation_blocked" in r["reason"] for r in records(root2))


def test_a_429_then_success_is_retried_honouring_retry_after(tmp_path, api):
    api.faults = [(429, {"Retry-After": "1"}, {"error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED"}}),
                  (503, {}, {"error": {"code": 503, "message": "unavailable", "status": "UNAVAILABLE"}})]
    root, params = project(tmp_path, gemini(api.url, concurrency=1), n=1)
    t0 = time.perf_counter()
    s = run_stage("teacher_images", params, "fx", root, progress=False)
    assert s["ok"] == 1 and [r["status"] for r in api.requests] == [429, 503, 200]
    assert time.perf_counter() - t0 >= 1.0  # the Retry-After was honoured


def test_retries_run_out_and_fatal_answers_stop_the_run(tmp_path, api):
    api.faults = [(500, {}, {"error": {"message": "internal"}})] * 3
    root, params = project(tmp_path, gemini(api.url, max_retries=2, concurrency=1), n=1)
    with pytest.raises(ApiError, match="gave up after 3 attempts .HTTP 500"):
        run_stage("teacher_images", params, "fx", root, progress=False)
    # a model that is not served (any more): named, with where to check
    api.faults = [(404, {}, {"error": {"code": 404, "status": "NOT_FOUND",
                                       "message": "Publisher Model `gemini-3.1-flash-image` was not found or your project does not have access to it."}})]
    with pytest.raises(ApiError, match=r"gemini-image \(gemini-3.1-flash-image\): HTTP 404 NOT_FOUND.*is the model still served"):
        run_stage("teacher_images", params, "fx", root, progress=False)
    # OpenAI's 429 for an empty account is not worth retrying
    api.faults = [(429, {}, {"error": {"code": "insufficient_quota", "message": "You exceeded your current quota", "type": "insufficient_quota"}})]
    n0 = len(api.requests)
    root2, params2 = project(tmp_path / "o", openai(api.url), n=1)
    with pytest.raises(ApiError, match="insufficient_quota|exceeded your current quota"):
        run_stage("teacher_images", params2, "fx", root2, progress=False)
    assert len(api.requests) == n0 + 1
    # wrong credentials: named, and never echoed
    os.environ["OPENAI_API_KEY"] = "sk-wrong-key-1234"
    with pytest.raises(CredentialsError, match=r"\$OPENAI_API_KEY") as e:
        run_stage("teacher_images", params2, "fx", root2, progress=False)
    os.environ["GEMINI_API_KEY"] = "AIza-wrong-key-5678"
    root3, params3 = project(tmp_path / "g", gemini(api.url, service="gemini-api"), n=1)
    with pytest.raises(CredentialsError, match=r"\$GEMINI_API_KEY") as e2:
        run_stage("teacher_images", params3, "fx", root3, progress=False)
    assert "sk-wrong" not in str(e.value) and "AIza-wrong" not in str(e2.value)


def test_an_api_that_gives_up_is_one_line_naming_the_teacher_and_the_sample(tmp_path, api, monkeypatch, capsys):
    from fxassets.cli.main import main

    teacher = gemini(api.url, max_retries=1, concurrency=1)
    run_stage("teacher_images", project(tmp_path, teacher, n=2)[1], "fx", tmp_path, progress=False)
    root, params = project(tmp_path, teacher, n=3)  # a third face: the one the API gives up on
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    api.faults = [(503, {}, {"error": {"code": 503, "message": "unavailable", "status": "UNAVAILABLE"}})] * 2
    monkeypatch.chdir(root)
    assert main(["stage", "teacher_images", "--effect", "fx", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fxassets: error: sample faces_002: gemini-image: gave up after 2 attempts (HTTP 503") and "\n" not in err
    assert "the samples finished before it are cached" in err
    n = len(api.requests)
    api.faults = []
    assert run_stage("teacher_images", params, "fx", root, progress=False)["cached"] == 2 and len(api.requests) == n + 1


def test_missing_credentials_fail_before_any_request(tmp_path, api, monkeypatch):
    monkeypatch.delenv("GOOGLE_OAUTH_ACCESS_TOKEN")
    monkeypatch.setitem(sys.modules, "google.auth", None)  # as if google-auth were not installed
    root, params = project(tmp_path, gemini(api.url), n=1)
    with pytest.raises(CredentialsError, match="GOOGLE_OAUTH_ACCESS_TOKEN.*google-auth"):
        run_stage("teacher_images", params, "fx", root, progress=False)
    monkeypatch.delenv("GEMINI_API_KEY")
    root1, params1 = project(tmp_path / "g", gemini(api.url, service="gemini-api"), n=1)
    with pytest.raises(CredentialsError, match="GEMINI_API_KEY"):
        run_stage("teacher_images", params1, "fx", root1, progress=False)
    monkeypatch.delenv("OPENAI_API_KEY")
    root2, params2 = project(tmp_path / "o", openai(api.url), n=1)
    with pytest.raises(CredentialsError, match="OPENAI_API_KEY"):
        run_stage("teacher_images", params2, "fx", root2, progress=False)
    assert api.requests == []


# -- the models' lifecycle and prices ------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher, replacement", [
    ({"kind": "imagen", "project": "p", "model": "imagen-3.0-capability-001"}, "teacher.kind: gemini-image"),
    ({"kind": "gemini-image", "project": "p", "model": "imagen-4.0-ultra-generate-001"}, "model: gemini-3-pro-image"),
    ({"kind": "gemini-image", "project": "p", "model": "gemini-3.1-flash-image-preview"}, "model: gemini-3.1-flash-image"),
    ({"kind": "openai-images", "model": "dall-e-3"}, "2026-05-12; use model: gpt-image-2"),
    ({"kind": "openai-images", "model": "dall-e-2"}, "2026-05-12; use model: gpt-image-2"),
    ({"kind": "openai-images", "model": "gpt-image-1.5-2025-12-16"}, "2026-12-01; use model: gpt-image-2"),
    ({"kind": "openai-images", "model": "gpt-image-1-mini"}, "2026-12-01; use model: gpt-image-2"),
])
def test_shut_down_kinds_and_models_fail_before_any_request_naming_the_replacement(tmp_path, api, teacher, replacement):
    p = tmp_path / "params.yaml"
    p.write_text(json.dumps({"teacher": {**teacher, "endpoint": api.url}, "effects": {"fx": {"prompt": "p"}}}))
    with pytest.raises(ConfigError) as e:
        load_params(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: teacher.") and "shut down" in msg and replacement in msg, msg
    if teacher["kind"] != "imagen":  # a config made in code is stopped by the stage's first check
        root, params = project(tmp_path, gemini(api.url) if teacher["kind"] == "gemini-image" else openai(api.url), n=1)
        bad = params.model_copy(update={"teacher": params.teacher.model_copy(update={"model": teacher["model"]})})
        with pytest.raises(ValueError, match=f"teacher.model: .*{re.escape(replacement)}"):
            run_stage("teacher_images", bad, "fx", root, progress=False)
        assert api.requests == []


def test_legacy_models_warn_naming_the_current_one(tmp_path, api, caplog):
    root, params = project(tmp_path, openai(api.url, model="gpt-image-1", price_per_image=0.04), n=1)
    with caplog.at_level(logging.WARNING, logger="fxassets.teachers.api.base"):
        assert run_stage("teacher_images", params, "fx", root, progress=False)["ok"] == 1
    assert "gpt-image-1 is a legacy model" in caplog.text and "the current one is gpt-image-2" in caplog.text


def test_each_model_has_its_listed_price(tmp_path, api):
    price = lambda t: Params.model_validate({"teacher": t, "effects": {"fx": {"prompt": "p"}}}).teacher.price  # noqa: E731
    assert price(gemini(api.url)) == 0.067 and price(gemini(api.url, image_size="4K")) == 0.151
    assert price(gemini(api.url, model="gemini-3-pro-image", image_size="2K")) == 0.134
    assert price(gemini(api.url, model="gemini-2.5-flash-image", image_size=None)) == 0.039
    assert price({"kind": "openai-images"}) == 0.04 and price({"kind": "openai-images", "size": "1536x1024", "quality": "high"}) == 0.225
    assert price(gemini(api.url, price_per_image=0.5)) == 0.5
    # the estimate uses it: 3 samples x 0.067 over a 0.1 USD bound
    root, params = project(tmp_path, gemini(api.url, max_cost=0.1), n=3)
    with pytest.raises(BudgetExceeded, match=r"3 samples to request x 0.067 USD = 0.20 USD estimated"):
        run_stage("teacher_images", params, "fx", root, progress=False)
    # a model with no listed price needs one, said before any request
    unlisted = params.model_copy(update={"teacher": params.teacher.model_copy(update={"model": "gemini-4-image"})})
    with pytest.raises(ValueError, match=r"^teacher.price_per_image: no listed price for model 'gemini-4-image' at 1K; set"):
        run_stage("teacher_images", unlisted, "fx", root, progress=False)
    assert api.requests == []


# -- openai-images -------------------------------------------------------------------------------------------------


def test_openai_edits_are_multipart_and_map_back_onto_the_source(tmp_path, api):
    root, params = project(tmp_path, openai(api.url, size="512x256", input_fidelity="high", price_per_image=0.1), n=2, px=64)
    s = run_stage("teacher_images", params, "fx", root, progress=False)
    assert s["ok"] == 2 and len(api.requests) == 2
    src = sources(root)
    for req in api.requests:
        f = req["fields"]
        assert (f["model"], f["n"], f["size"], f["quality"], f["input_fidelity"], f["output_format"], f["prompt"]) == (
            "gpt-image-2-2026-04-21", "1", "512x256", "medium", "high", "png", "a cartoon")
        assert "response_format" not in f and "moderation" not in f and req["image"].shape == (64, 128, 3)  # padded to 2:1
    for rec in records(root):
        out = read_png_rgb(EffectPaths(root, "fx").teacher_dir / rec["image"])
        assert out.shape == (64, 64, 3)
        assert np.abs(out.astype(int) - edited(src[rec["sample_id"]])).mean() < 3  # the padding cropped off again
    fp = make_teacher(params.teacher, root=root).fingerprint()
    assert fp["model"] == "gpt-image-2-2026-04-21" and fp["output_format"] == "png"
    no_secret_written(root)


def test_openai_generates_sources(tmp_path, api):
    from fxassets.cli.generate_sources import SourcesConfig, generate_sources

    t = openai(api.url, moderation="low", quality="high", output_format="webp", price_per_image=0.1)
    cfg = Params.model_validate({"teacher": t, "effects": {"fx": {"prompt": "p"}}}).teacher
    s = generate_sources(cfg, SourcesConfig(n=2), tmp_path / "gen", tmp_path, progress=False)
    assert s["ok"] == 2
    for req in api.requests:
        assert req["path"] == "/v1/images/generations" and "response_format" not in req["fields"]
        assert (req["fields"]["moderation"], req["fields"]["quality"], req["fields"]["output_format"]) == ("low", "high", "webp")


# -- resumability and cost -----------------------------------------------------------------------------------------

KILLED_RUN = r"""
import json, sys
from pathlib import Path
from fxassets.core.config import Params
from fxassets.stages import run_stage
root = Path(sys.argv[1])
run_stage("teacher_images", Params.model_validate(json.loads(sys.argv[2])), "fx", root, progress=False)
"""


def test_a_killed_run_resumes_without_asking_again_for_finished_samples(tmp_path, api):
    root, params = project(tmp_path, gemini(api.url), n=6)
    api.hold_after = 3  # answer three, then hold every request: the run is killed half way
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(root), params.model_dump_json()], stderr=subprocess.PIPE)
    responses = root / ".cache/fxassets/api"
    deadline = time.time() + 60
    while len(cached_images(responses)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(cached_images(responses)) == 3, proc.stderr.read().decode()[-2000:]
    finished = set(api.answered)
    assert len(finished) == 3 and not EffectPaths(root, "fx").teacher_dir.exists()
    first = len(api.requests)  # 3 answered + the ones held when it was killed

    api.hold_after = None
    api.release.set()
    s = run_stage("teacher_images", params, "fx", root, progress=False)
    assert s["ok"] == 6
    again = Counter(r["sample"] for r in api.requests[first:])
    assert not finished & set(again), "a finished sample was requested again"
    statuses = [(r["sample"], r["status"]) for r in api.requests]
    assert all(v == 1 for v in api.answered.values()) and len(api.answered) == 6, statuses  # every sample paid once
    src = sources(root)
    for rec in records(root):
        assert np.array_equal(read_png_rgb(EffectPaths(root, "fx").teacher_dir / rec["image"]), edited(src[rec["sample_id"]]))


def test_the_cost_bound_stops_a_run(tmp_path, api):
    root, params = project(tmp_path, gemini(api.url, price_per_image=0.5, max_cost=1.0, concurrency=1), n=3)
    with pytest.raises(BudgetExceeded, match=r"3 samples to request x 0.5 USD = 1.50 USD estimated, over teacher.max_cost 1.00"):
        run_stage("teacher_images", params, "fx", root, progress=False)
    assert api.requests == []  # refused before any request

    # mid-run: the ledger stops sending once the next image would cross the bound (here: no estimate beforehand)
    teacher = make_teacher(params.teacher, root=root)
    src = list(sources(root).items())
    recs = [{"seed": i, "prompt": "p", "sample_id": k} for i, (k, _) in enumerate(src)]
    with pytest.raises(BudgetExceeded, match="spent 1.00 USD .2 requests"):
        teacher.edit_batch([im for _, im in src], recs)
    assert len(api.requests) == 2
    # the bound is raised: only the third is asked for, the first two come from the response cache
    teacher = make_teacher(params.teacher.model_copy(update={"max_cost": 5.0}), root=root)
    outs = teacher.edit_batch([im for _, im in src], recs)
    assert len(api.requests) == 3 and all(np.array_equal(o, edited(im)) for o, (_, im) in zip(outs, src))
    teacher.close()

    # a run whose estimate fits, with samples already cached, counts only the uncached ones
    params2 = params.model_copy(update={"teacher": params.teacher.model_copy(update={"max_cost": 0.5})})
    (root / "faces" / "extra.png").write_bytes((root / "faces" / f"{src[0][0]}.png").read_bytes())
    run_stage("prompts", params2, "fx", root, progress=False)
    with pytest.raises(BudgetExceeded, match="4 samples to request"):
        run_stage("teacher_images", params2, "fx", root, progress=False)


def test_timeouts_count_as_spent(tmp_path, api):
    """A request that timed out may have been made (and billed): it is retried, and counted."""
    api.delay = 0.6
    root, params = project(tmp_path, gemini(api.url, timeout=0.3, max_retries=1, price_per_image=1.0, max_cost=1.5, concurrency=1), n=1)
    with pytest.raises(BudgetExceeded, match="spent 1.00 USD"):
        run_stage("teacher_images", params, "fx", root, progress=False)
    assert len(api.requests) == 1


def test_backoff_and_retry_after_parsing():
    assert parse_retry_after({"retry-after": "3"}) == 3.0 and parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({}) is None and parse_retry_after({"retry-after": "soon"}) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < parse_retry_after({"retry-after": date}) <= 31
    cfg = Params.model_validate({"teacher": gemini("http://x", backoff=1.0, max_backoff=8.0), "effects": {"fx": {"prompt": "p"}}}).teacher
    c = ApiClient("t", "http://x", cfg, lambda r: {}, lambda: [])
    for attempt, cap in [(0, 1), (1, 2), (2, 4), (3, 8), (6, 8)]:
        d = [c.delay(attempt, None) for _ in range(200)]
        assert cap / 2 <= min(d) and max(d) <= cap and len(set(d)) > 100  # exponential, capped, jittered
    assert 5 <= c.delay(0, 5.0) <= 5.5 and c.delay(0, 1e9) <= 660
    led = Ledger(0.4, 1.0)
    assert led.reserve() and led.reserve() and not led.reserve()
    led.settle(False)
    assert led.reserve()


def test_api_teacher_config_errors(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(json.dumps({"teacher": {"kind": "gemini-image"}, "effects": {"fx": {"prompt": "p"}}}))
    with pytest.raises(ConfigError, match=r"teacher\.project: Value error, needed with service: vertex-ai"):
        load_params(p)
    p.write_text(json.dumps({"teacher": {"kind": "gemini-image", "service": "gemini-api", "aspect_ratio": "2:1"}, "effects": {"fx": {"prompt": "p"}}}))
    with pytest.raises(ConfigError, match=r"teacher\.aspect_ratio: Input should be '1:1'"):
        load_params(p)
    p.write_text(json.dumps({"teacher": {"kind": "openai-images", "size": "big", "api_key": "sk-no"}, "effects": {"fx": {"prompt": "p"}}}))
    with pytest.raises(ConfigError, match=r"teacher\.api_key: unknown key") as e:  # keys never live in params
        load_params(p)
    assert "teacher.size" in str(e.value)


# -- latent-edit ---------------------------------------------------------------------------------------------------

LATENT = 8


@pytest.fixture(scope="module")
def tiny_gan(tmp_path_factory) -> Path:
    """A tiny random generator (latent 8 -> 3 x 16 x 16 in -1..1) and mapping (z 8 -> w 8), TorchScript and ONNX,
    and a direction."""
    import torch

    d = tmp_path_factory.mktemp("gan")
    torch.manual_seed(0)

    class G(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(LATENT, 3 * 16 * 16)

        def forward(self, w):
            return torch.tanh(self.fc(w) * 2).reshape(-1, 3, 16, 16)

    g, m = G().eval(), torch.nn.Sequential(torch.nn.Linear(LATENT, LATENT), torch.nn.LeakyReLU(0.2)).eval()
    x = torch.zeros(1, LATENT)
    import warnings

    with warnings.catch_warnings():  # TorchScript and the legacy ONNX exporter are deprecated in torch 2.14
        warnings.simplefilter("ignore")
        torch.jit.trace(g, x).save(str(d / "g.pt"))
        torch.jit.trace(m, x).save(str(d / "m.pt"))
        for net, name in ((g, "g.onnx"), (m, "m.onnx")):
            torch.onnx.export(net, (x,), str(d / name), dynamo=False, input_names=["w"], output_names=["y"], dynamic_axes={"w": {0: "b"}, "y": {0: "b"}})
    np.save(d / "smile.npy", np.random.default_rng(1).standard_normal(LATENT).astype(np.float32))
    np.save(d / "age.npy", np.random.default_rng(2).standard_normal(LATENT).astype(np.float32))
    return d


def test_latent_edit_makes_pairs_with_no_photos(tmp_path, tiny_gan):
    import torch

    from fxassets.cli.generate_sources import SourcesConfig, generate_sources

    teacher = {"kind": "latent-edit", "generator": str(tiny_gan / "g.onnx"), "mapping": str(tiny_gan / "m.onnx"),
               "direction": str(tiny_gan / "{prompt}.npy"), "strength": 2.0, "batch_size": 2}
    params = Params.model_validate({"faces": {"source": "gan"}, "teacher": teacher, "effects": {"fx": {"prompt": "smile", "seed": 3}}})
    s = generate_sources(params.teacher, SourcesConfig(n=3, seed=5), tmp_path / "gan", tmp_path, progress=False)
    assert s["ok"] == 3
    gan = tmp_path / "gan"
    assert sorted(p.name for p in gan.glob("gen_*")) == [f"gen_0000{i}.{x}" for i in range(3) for x in ("npy", "png")]
    man = (gan / "manifest.csv").read_text().splitlines()
    assert man[0].startswith("file,person_id") and len(man) == 4

    # the same seed gives the same pair: generate again from nothing, with the TorchScript generator
    ts = {**teacher, "generator": str(tiny_gan / "g.pt"), "mapping": str(tiny_gan / "m.pt"), "latent_shape": [LATENT]}
    ts_params = Params.model_validate({**params.model_dump(mode="json"), "teacher": ts})
    generate_sources(ts_params.teacher, SourcesConfig(n=3, seed=5), tmp_path / "gan2", tmp_path, progress=False)
    for i in range(3):
        a, b = read_png_rgb(gan / f"gen_0000{i}.png"), read_png_rgb(tmp_path / "gan2" / f"gen_0000{i}.png")
        assert a.shape == (16, 16, 3) and np.abs(a.astype(int) - b).max() <= 1
        assert np.allclose(np.load(gan / f"gen_0000{i}.npy"), np.load(tmp_path / "gan2" / f"gen_0000{i}.npy"), atol=1e-5)

    # the teacher stage: target = G(w + s * d), with w read from beside each source
    run_stage("prompts", params, "fx", tmp_path, progress=False)
    out = run_stage("teacher_images", params, "fx", tmp_path, progress=False)
    assert out["ok"] == 3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        g = torch.jit.load(str(tiny_gan / "g.pt"))
    d = np.load(tiny_gan / "smile.npy")
    for rec in records(tmp_path):
        w = np.load(gan / f"{rec['sample_id']}.npy")
        want = ((g(torch.from_numpy(w + 2.0 * d)[None]).detach().numpy()[0].transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255)
        got = read_png_rgb(EffectPaths(tmp_path, "fx").teacher_dir / rec["image"])
        assert np.abs(got.astype(int) - want).max() <= 1
        assert not np.array_equal(got, read_png_rgb(gan / f"{rec['sample_id']}.png"))

    # strength 0 gives the source back; the direction file is in the fingerprint
    zero = make_teacher(params.teacher.model_copy(update={"strength": 0.0}), root=tmp_path)
    src = read_png_rgb(gan / "gen_00000.png")
    rec = {"source": "gan/gen_00000.png", "prompt": "smile", "seed": 0}
    assert np.abs(zero.edit(src, rec).astype(int) - src).max() <= 1
    fp = make_teacher(params.teacher, root=tmp_path).fingerprint()
    np.save(tiny_gan / "age.npy", np.zeros(LATENT, np.float32))
    assert make_teacher(params.teacher, root=tmp_path).fingerprint()["hash"] != fp["hash"]
    assert fp["generator"] and fp["strength"] == 2.0 and set(fp["directions"]) == {"age.npy", "smile.npy"}


def test_latent_edit_setup_errors_are_named(tmp_path, tiny_gan):
    params = Params.model_validate({"faces": {"source": "faces"}, "effects": {"fx": {"prompt": "smile"}},
                                    "teacher": {"kind": "latent-edit", "generator": str(tiny_gan / "g.pt"), "direction": str(tiny_gan / "smile.npy")}})
    t = make_teacher(params.teacher, root=tmp_path)
    with pytest.raises(ValueError, match="latent_shape"):
        t.generate_batch([{"seed": 1}])
    (tmp_path / "faces").mkdir()
    cv2.imwrite(str(tmp_path / "faces" / "a.png"), np.zeros((16, 16, 3), np.uint8))
    run_stage("prompts", params, "fx", tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match=r"a\.npy: no latent beside the source"):
        run_stage("teacher_images", params, "fx", tmp_path, progress=False)
    bad = make_teacher(params.teacher.model_copy(update={"direction": "nope/{prompt}.npy"}), root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        bad.fingerprint()

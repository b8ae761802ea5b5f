"""Teachers behind a paid HTTP API: `imagen` (Google Imagen on Vertex AI) and `openai-images` (OpenAI's images API).

Both share one client (`ApiClient`):
- at most `concurrency` requests in flight (a thread pool that lives as long as the teacher, one keep-alive HTTP
  session per thread);
- 408 / 429 / 5xx answers, timeouts and dropped connections are retried with exponential backoff and jitter
  (`backoff` doubling up to `max_backoff`), and a `Retry-After` (or OpenAI's `retry-after-ms`) is honoured;
  a 429 that says the account is out of quota (`insufficient_quota`) is not retried;
- a write-ahead response cache (`<cache>/api/<key>.img`, `$FXASSETS_CACHE` moves it): each image is stored the
  moment it arrives, keyed by a hash of the request (model, prompt, seed, source bytes, settings; never the
  credentials), so a run killed half way never pays twice for an image, even one whose batch had not finished;
  the stage's per-sample cache (`teacher_images.py`) takes over once a batch is recorded there, and the entries of a
  run that ends normally are removed;
- a cost bound: `run_session(n)` estimates n uncached samples x `price_per_image` and refuses to start over
  `max_cost`; during the run a request is only sent while spent + reserved + its price <= `max_cost` (a 2xx answer
  and a timed-out request count as spent, a 429 / 5xx / refused request does not), else the run stops (`BudgetExceeded`)
  once the requests in flight are back;
- a refused image (Imagen's `raiFilteredReason` or no image at all, a 400 naming Responsible AI; OpenAI's
  `content_policy_violation` / `moderation_blocked`) becomes a `SampleRejected` with the provider's reason.

Credentials come only from the environment (Imagen: `$GOOGLE_OAUTH_ACCESS_TOKEN` or Application Default Credentials
through google-auth when installed; OpenAI: `$OPENAI_API_KEY`), are sent only in the Authorization header, and are
scrubbed from every error message. The model version is in the fingerprint; endpoint, concurrency, timeouts,
retries and prices are not (they never change an image). Request and response shapes: docs/api_teachers.md."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import cv2
import numpy as np

from fxassets.config import EffectTeacher, ImagenTeacher, OpenAIImagesTeacher
from fxassets.teachers.base import SampleRejected, Teacher
from fxassets.teachers.diffusers_teachers import cache_root, render_prompt

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 600.0  # seconds: a longer Retry-After is cut to this
GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


class ApiError(RuntimeError):
    """The API failed in a way retrying does not fix (bad request, auth, retries used up): the run stops."""


class CredentialsError(ApiError, ValueError):
    """No credentials in the environment (or they were refused); the message says how to set them."""


class BudgetExceeded(ValueError):
    """The run would spend more than `max_cost`: raised before the first request, or once the requests in flight
    are back. Finished images are kept (cached), so raising the bound and running again pays only for the rest."""


class _OverBudget(Exception):
    pass


# -- cost accounting -------------------------------------------------------------------------------------------


class Ledger:
    """Thread-safe spend accounting in USD. A request reserves its price before it is sent; the answer settles
    it as spent (2xx, or a timeout: the provider may have made and billed the image) or releases it."""

    def __init__(self, price: float, max_cost: float):
        self.price, self.max_cost = float(price), float(max_cost)
        self.spent = 0.0
        self.reserved = 0.0
        self.charged = 0  # requests counted as spent
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        with self._lock:
            if self.spent + self.reserved + self.price > self.max_cost + 1e-9:
                return False
            self.reserved += self.price
            return True

    def settle(self, charged: bool) -> None:
        with self._lock:
            self.reserved -= self.price
            if charged:
                self.spent += self.price
                self.charged += 1


# -- the HTTP client -------------------------------------------------------------------------------------------


@dataclass
class ApiRequest:
    """One request: a JSON body, or multipart form fields + files. `key` names it in the response cache."""

    path: str
    json_body: dict[str, Any] | None = None
    fields: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            h = hashlib.sha256()
            h.update(self.path.encode() + b"\0")
            h.update(json.dumps(self.json_body, sort_keys=True).encode() + b"\0")
            h.update(json.dumps(self.fields, sort_keys=True).encode() + b"\0")
            for name, (fname, data, ctype) in sorted((self.files or {}).items()):
                h.update(f"{name}\0{fname}\0{ctype}\0".encode() + hashlib.sha256(data).digest())
            self.key = h.hexdigest()


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date); None if absent."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(ra).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@dataclass
class ClientStats:
    requests: int = 0  # HTTP requests sent (retries included)
    retries: int = 0
    cache_hits: int = 0  # images served from the response cache (no request)
    images: int = 0  # images received
    refused: int = 0
    waited: float = 0.0  # seconds slept between retries
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: float) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items() if not k.startswith("_")}


class ApiClient:
    """POSTs with retries, backoff, a concurrency limit and a cost ledger; see the module docstring."""

    def __init__(self, name: str, base_url: str, cfg, auth: Callable[[bool], dict[str, str]], secrets: Callable[[], list[str]]):
        self.name, self.base_url, self.cfg = name, base_url.rstrip("/"), cfg
        self._auth, self._secrets = auth, secrets
        self.ledger = Ledger(cfg.price_per_image, cfg.max_cost)
        self.stats = ClientStats()
        self.sleep: Callable[[float], None] = time.sleep
        self.rng = random.Random()
        self._local = threading.local()
        self._sessions: list[Any] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    # -- plumbing ------------------------------------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        for s in self._secrets():
            if s and len(s) >= 4:
                text = text.replace(s, "***")
        return text

    def _session(self):
        s = getattr(self._local, "session", None)
        if s is None:
            import requests

            s = requests.Session()
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    @property
    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix=f"fxassets-{self.name}")
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            sessions, self._sessions = self._sessions, []
        if pool is not None:
            pool.shutdown(wait=True)
        for s in sessions:
            s.close()

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry `attempt` (0-based): Retry-After when the server gave one (plus up to 10 % jitter),
        else exponential backoff with equal jitter: half the doubled delay fixed, half random."""
        if retry_after is not None:
            wait = min(retry_after, MAX_RETRY_AFTER)
            return wait + self.rng.uniform(0, 0.1 * wait)
        cap = min(self.cfg.max_backoff, self.cfg.backoff * (2**attempt))
        return cap / 2 + self.rng.uniform(0, cap / 2)

    @staticmethod
    def _permanent(resp) -> bool:
        """A 429 that retrying cannot fix (OpenAI: the account has no quota or credit left)."""
        if resp.status_code != 429:
            return False
        try:
            body = resp.json()
        except ValueError:
            return False
        err = body.get("error") if isinstance(body, dict) else None
        return isinstance(err, dict) and err.get("code") in ("insufficient_quota", "billing_hard_limit_reached")

    # -- one request with retries ----------------------------------------------------------------------------------
    def post(self, req: ApiRequest):
        """Send `req` until it gets an answer that is not retried; return the `requests.Response` (2xx or a 4xx the
        caller interprets). Raises `_OverBudget` when the ledger refuses, `ApiError` when retries run out."""
        import requests

        url = self.base_url + req.path
        refreshed = False
        attempt = 0
        while True:
            if not self.ledger.reserve():
                raise _OverBudget()
            charged, why, retry_after, resp = False, "", None, None
            try:
                kw: dict[str, Any] = {"headers": self._auth(False), "timeout": (self.cfg.connect_timeout, self.cfg.timeout)}
                if req.json_body is not None:
                    kw["json"] = req.json_body
                else:
                    kw["data"] = req.fields
                    kw["files"] = {k: v for k, v in (req.files or {}).items()}
                self.stats.add(requests=1)
                resp = self._session().post(url, **kw)
            except requests.exceptions.ReadTimeout:
                charged, why = True, f"no answer within {self.cfg.timeout:g} s"
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                why = f"connection failed ({type(exc).__name__})"
            except BaseException:
                self.ledger.settle(False)
                raise
            if resp is not None:
                if resp.ok:
                    self.ledger.settle(True)
                    return resp
                if resp.status_code == 401 and not refreshed:
                    self.ledger.settle(False)
                    refreshed = True
                    self._auth(True)  # an expired token: refresh once and try again at once
                    continue
                retriable = resp.status_code in RETRY_STATUSES or 500 <= resp.status_code < 600
                if not retriable or self._permanent(resp):
                    self.ledger.settle(False)
                    return resp
                why, retry_after = f"HTTP {resp.status_code}", parse_retry_after(resp.headers)
                resp.close()
            self.ledger.settle(charged)
            if attempt >= self.cfg.max_retries:
                raise ApiError(f"{self.name}: gave up after {attempt + 1} attempts ({why}) at {urlsplit(url).netloc}")
            wait = self.delay(attempt, retry_after)
            log.info("%s: %s; retry %d/%d in %.2f s", self.name, why, attempt + 1, self.cfg.max_retries, wait)
            self.stats.add(retries=1, waited=wait)
            self.sleep(wait)
            attempt += 1


# -- images in and out ---------------------------------------------------------------------------------------------


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover
        raise ValueError("could not encode PNG")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray | None:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize(rgb: np.ndarray, w: int, h: int) -> np.ndarray:
    if rgb.shape[1] == w and rgb.shape[0] == h:
        return rgb
    shrink = w * h < rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)


def fit_side(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """`rgb` shrunk so that its long side is at most `max_side` (aspect kept)."""
    h, w = rgb.shape[:2]
    s = max_side / max(h, w)
    return rgb if s >= 1 else resize(rgb, max(1, round(w * s)), max(1, round(h * s)))


class ResponseCache:
    """Write-ahead store of the images an API returned, one atomic file per request key."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.img"

    def get(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except OSError:
            return None

    def put(self, key: str, data: bytes) -> None:
        from fxassets.atomic import write_bytes

        write_bytes(self.path(key), data)

    def drop(self, keys: list[str]) -> None:
        for k in keys:
            self.path(k).unlink(missing_ok=True)


# -- the teachers ----------------------------------------------------------------------------------------------


@dataclass
class _Job:
    req: ApiRequest
    finish: Callable[[np.ndarray], np.ndarray]  # the decoded API image -> the sample's output


class ApiTeacher(Teacher):
    """Shared by the API teachers: sessions, cost bound, concurrency, caching. Subclasses build requests and read
    answers."""

    version = "1"
    api = ""  # "vertex-ai" | "openai"
    generates = True  # text-to-image for sources (fxassets generate-sources --from-params)

    def __init__(self, cfg, effect: EffectTeacher | None = None):
        self.cfg = cfg
        self.effect = effect or EffectTeacher()
        self.batch_size = 4 * cfg.concurrency  # keeps the pool busy; the response cache makes batch size costless
        self._client: ApiClient | None = None
        self._used: list[str] = []  # response-cache keys written or read in this session
        self._used_lock = threading.Lock()

    # -- to implement ---------------------------------------------------------------------------------------------
    def base_url(self) -> str:
        raise NotImplementedError

    def auth_headers(self, refresh: bool) -> dict[str, str]:
        raise NotImplementedError

    def secrets(self) -> list[str]:
        return []

    def edit_request(self, rgb: np.ndarray, record: dict[str, Any]) -> _Job:
        raise NotImplementedError

    def generate_request(self, record: dict[str, Any]) -> _Job:
        raise NotImplementedError

    def read_answer(self, resp) -> bytes | SampleRejected:
        """The image bytes of a 2xx answer, or why the provider refused; raise ApiError for anything else."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------------
    @property
    def client(self) -> ApiClient:
        if self._client is None:
            self._client = ApiClient(self.kind, self.base_url(), self.cfg, self.auth_headers, self.secrets)
        return self._client

    @property
    def responses(self) -> ResponseCache:
        return ResponseCache(cache_root(self.root) / "api")

    def runtime(self) -> dict[str, Any]:
        import requests

        return {"api": self.api, "host": urlsplit(self.base_url()).netloc, "client": f"requests {requests.__version__}"}

    def estimate(self, n: int) -> float:
        return round(n * self.cfg.price_per_image, 6)

    @contextmanager
    def run_session(self, n_uncached: int) -> Iterator[None]:
        c = self.cfg
        est = self.estimate(n_uncached)
        if n_uncached and est > c.max_cost + 1e-9:
            raise BudgetExceeded(
                f"{self.kind}: {n_uncached} samples to request x {c.price_per_image:g} USD = {est:.2f} USD estimated, "
                f"over teacher.max_cost {c.max_cost:.2f} USD; nothing was requested. Raise teacher.max_cost, or lower "
                "effects.<name>.samples (cached samples cost nothing)")
        client = self.client
        client.ledger = Ledger(c.price_per_image, c.max_cost)  # the bound is per run
        with self._used_lock:
            self._used = []
        if n_uncached:
            self.auth_headers(False)  # fail before the first request when there are no credentials
            log.warning("%s: %d samples to request x %g USD = %.2f USD estimated (max_cost %.2f USD)",
                        self.kind, n_uncached, c.price_per_image, est, c.max_cost)
        ok = False
        try:
            yield
            ok = True
        finally:
            client.close()  # the pool's threads and their connections (made again if the teacher is used later)
            if ok:  # every image of this run is in the stage's own cache now
                with self._used_lock:
                    used, self._used = self._used, []
                self.responses.drop(used)
            if n_uncached:
                log.info("%s: spent %.2f USD (estimate %.2f); %s", self.kind, client.ledger.spent, est, client.stats.as_dict())

    def _one(self, job: _Job, stop: threading.Event) -> np.ndarray | SampleRejected | None:
        """Run one job: from the response cache, else by request (then cached at once). None: not run (stopping)."""
        cache = self.responses
        data = cache.get(job.req.key)
        if data is not None:
            img = decode_image(data)
            if img is not None:
                self.client.stats.add(cache_hits=1)
                with self._used_lock:
                    self._used.append(job.req.key)
                return job.finish(img)
        if stop.is_set():
            return None
        resp = self.client.post(job.req)
        try:
            got = self.read_answer(resp)
        finally:
            resp.close()
        if isinstance(got, SampleRejected):
            self.client.stats.add(refused=1)
            return got
        img = decode_image(got)
        if img is None:
            return SampleRejected(f"{self.kind}: the API returned an image that cannot be decoded")
        cache.put(job.req.key, got)
        with self._used_lock:
            self._used.append(job.req.key)
        self.client.stats.add(images=1)
        return job.finish(img)

    def _run(self, jobs: list[_Job]) -> list[np.ndarray | SampleRejected]:
        """All jobs through the pool; every answer that arrives is cached before a stop or an error is raised."""
        stop = threading.Event()
        errors: list[BaseException] = []
        over = [False]

        def work(job: _Job):
            try:
                return self._one(job, stop)
            except _OverBudget:
                over[0] = True
                stop.set()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other requests are back
                errors.append(exc)
                stop.set()
            return None

        outs = list(self.client.pool.map(work, jobs))
        if errors:
            raise errors[0]
        if over[0]:
            led = self.client.ledger
            raise BudgetExceeded(
                f"{self.kind}: stopped before exceeding teacher.max_cost {led.max_cost:.2f} USD: spent {led.spent:.2f} USD "
                f"({led.charged} requests x {led.price:g} USD, retries of timed-out requests included); the images "
                "already made are cached, raise max_cost and run again for the rest")
        return outs  # type: ignore[return-value]

    def edit(self, rgb: np.ndarray, record: dict[str, Any]) -> np.ndarray:
        out = self.edit_batch([rgb], [record])[0]
        if isinstance(out, SampleRejected):
            raise out
        return out

    def edit_batch(self, images: list[np.ndarray], records: list[dict[str, Any]]) -> list[np.ndarray | SampleRejected]:
        return self._run([self.edit_request(img, rec) for img, rec in zip(images, records, strict=True)])

    def generate_batch(self, records: list[dict[str, Any]]) -> list[np.ndarray | SampleRejected]:
        return self._run([self.generate_request(rec) for rec in records])

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _error(self, resp) -> str:
        try:
            body = resp.json()
            err = body.get("error", body) if isinstance(body, dict) else body
            msg = err.get("message", "") if isinstance(err, dict) else str(err)
            status = (err.get("status") or err.get("code") or "") if isinstance(err, dict) else ""
        except ValueError:
            msg, status = resp.text[:300], ""
        return self.client.scrub(f"HTTP {resp.status_code} {status}: {msg}".strip())


# -- Imagen on Vertex AI ---------------------------------------------------------------------------------------

_RAI_WORDS = re.compile(r"responsible ai|sensitive words|safety|violat|prohibited|not allowed|blocked|filtered|celebrity|minor", re.I)


class ImagenTeacherImpl(ApiTeacher):
    """`POST {endpoint}/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:predict`.

    Edit: `instances[0] = {prompt, referenceImages: [{referenceType: REFERENCE_TYPE_RAW, referenceId: 1,
    referenceImage: {bytesBase64Encoded}}]}` (the prompt names the source as `[1]`); generate (sources):
    `instances[0] = {prompt}` with `generate_model`. `parameters`: sampleCount 1, seed (when the watermark is off;
    Imagen ignores seeds otherwise), personGeneration, safetySetting, includeRaiReason, outputOptions, and the
    optional editMode, editConfig.baseSteps, guidanceScale, negativePrompt, aspectRatio. Answer:
    `predictions[0].bytesBase64Encoded`, or `raiFilteredReason` when the image was filtered."""

    kind = "imagen"
    api = "vertex-ai"
    cfg: ImagenTeacher

    def __init__(self, cfg: ImagenTeacher, effect: EffectTeacher | None = None):
        super().__init__(cfg, effect)
        self._creds = None
        self._creds_lock = threading.Lock()

    def settings(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "model": c.model, "prompt_template": c.prompt_template, "edit_mode": c.edit_mode, "base_steps": c.base_steps,
            "guidance_scale": c.guidance_scale, "negative_prompt": c.negative_prompt, **self._common(), "max_side": c.max_side,
        }

    def generate_settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"model": c.generate_model, "negative_prompt": c.negative_prompt, "aspect_ratio": c.aspect_ratio, **self._common()}

    def _common(self) -> dict[str, Any]:
        c = self.cfg
        return {"person_generation": c.person_generation, "safety_setting": c.safety_setting, "add_watermark": c.add_watermark,
                "output_mime_type": c.output_mime_type}

    def base_url(self) -> str:
        c = self.cfg
        if c.endpoint:
            return c.endpoint.rstrip("/")
        return "https://aiplatform.googleapis.com" if c.location == "global" else f"https://{c.location}-aiplatform.googleapis.com"

    def _path(self, model: str) -> str:
        c = self.cfg
        return f"/v1/projects/{c.project}/locations/{c.location}/publishers/google/models/{model}:predict"

    # -- credentials ------------------------------------------------------------------------------------------
    def _token(self, refresh: bool) -> str:
        tok = os.environ.get(self.cfg.token_env, "").strip()
        if tok:
            return tok
        with self._creds_lock:
            if self._creds is None:
                try:
                    import google.auth
                    from google.auth.exceptions import DefaultCredentialsError
                except ImportError:
                    raise CredentialsError(
                        f"imagen: no credentials: set ${self.cfg.token_env} to an access token (for example "
                        f"`export {self.cfg.token_env}=$(gcloud auth print-access-token)`), or `pip install google-auth` and "
                        "set up Application Default Credentials (`gcloud auth application-default login`, or "
                        "GOOGLE_APPLICATION_CREDENTIALS=<service account key file>)") from None
                try:
                    self._creds, _ = google.auth.default(scopes=[GOOGLE_SCOPE])
                except DefaultCredentialsError as exc:
                    raise CredentialsError(f"imagen: no Application Default Credentials and ${self.cfg.token_env} is unset: {exc}") from None
            creds = self._creds
            if refresh or not creds.valid:
                import google.auth.transport.requests

                creds.refresh(google.auth.transport.requests.Request())
            return creds.token

    def auth_headers(self, refresh: bool) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token(refresh)}"}

    def secrets(self) -> list[str]:
        out = [os.environ.get(self.cfg.token_env, "").strip()]
        if self._creds is not None and getattr(self._creds, "token", None):
            out.append(self._creds.token)
        return out

    # -- requests ---------------------------------------------------------------------------------------------
    def _parameters(self, record: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        p: dict[str, Any] = {
            "sampleCount": 1, "addWatermark": c.add_watermark, "includeRaiReason": True,
            "personGeneration": c.person_generation, "safetySetting": c.safety_setting,
            "outputOptions": {"mimeType": c.output_mime_type},
        }
        if not c.add_watermark:
            p["seed"] = int(record["seed"]) % (2**32)
        if c.negative_prompt and record.get("negative_prompt"):
            p["negativePrompt"] = record["negative_prompt"]
        return p

    def edit_request(self, rgb: np.ndarray, record: dict[str, Any]) -> _Job:
        c = self.cfg
        src = fit_side(rgb, c.max_side)
        params = self._parameters(record)
        if c.edit_mode:
            params["editMode"] = c.edit_mode
        if c.base_steps:
            params["editConfig"] = {"baseSteps": c.base_steps}
        if c.guidance_scale is not None:
            params["guidanceScale"] = c.guidance_scale
        body = {
            "instances": [{
                "prompt": render_prompt(c.prompt_template, record),
                "referenceImages": [{
                    "referenceType": "REFERENCE_TYPE_RAW", "referenceId": 1,
                    "referenceImage": {"bytesBase64Encoded": base64.b64encode(encode_png(src)).decode()},
                }],
            }],
            "parameters": params,
        }
        h, w = rgb.shape[:2]
        return _Job(ApiRequest(self._path(c.model), json_body=body), lambda img: resize(img, w, h))

    def generate_request(self, record: dict[str, Any]) -> _Job:
        params = self._parameters(record)
        params["aspectRatio"] = self.cfg.aspect_ratio
        body = {"instances": [{"prompt": record.get("prompt", "")}], "parameters": params}
        return _Job(ApiRequest(self._path(self.cfg.generate_model), json_body=body), lambda img: img)

    def read_answer(self, resp) -> bytes | SampleRejected:
        if resp.ok:
            try:
                preds = resp.json().get("predictions") or []
            except (ValueError, AttributeError):
                raise ApiError(f"imagen: the answer is not JSON: {resp.text[:200]!r}") from None
            for p in preds:
                if isinstance(p, dict) and p.get("bytesBase64Encoded"):
                    return base64.b64decode(p["bytesBase64Encoded"])
            reasons = [p.get("raiFilteredReason") for p in preds if isinstance(p, dict) and p.get("raiFilteredReason")]
            if reasons:
                return SampleRejected(f"imagen filtered the image: {'; '.join(reasons)}")
            return SampleRejected("imagen returned no image (filtered by its safety settings, no reason given)")
        msg = self._error(resp)
        if resp.status_code == 400 and _RAI_WORDS.search(msg):
            return SampleRejected(f"imagen refused the request: {msg}")
        if resp.status_code in (401, 403):
            raise CredentialsError(f"imagen: the credentials were refused ({msg}); check ${self.cfg.token_env} or your ADC, "
                                   f"and that they may use Vertex AI in project {self.cfg.project}")
        model = urlsplit(resp.url).path.rsplit("/", 1)[-1].removesuffix(":predict")
        raise ApiError(f"imagen ({model}): {msg}")


# -- OpenAI images -------------------------------------------------------------------------------------------------

_OPENAI_REFUSALS = ("content_policy_violation", "moderation_blocked")


class OpenAIImagesTeacherImpl(ApiTeacher):
    """`POST {endpoint}/images/edits` (multipart: image, prompt, model, n, size, quality, input_fidelity) and
    `POST {endpoint}/images/generations` (JSON: model, prompt, n, size, quality, moderation); answer
    `data[0].b64_json`. A refusal is a 400 with `error.code` content_policy_violation or moderation_blocked. DALL-E
    models get `response_format: b64_json` (gpt-image models always answer base64 and reject it). No seed: the API
    takes none."""

    kind = "openai-images"
    api = "openai"
    cfg: OpenAIImagesTeacher

    def settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"model": c.model, "prompt_template": c.prompt_template, "size": c.size, "quality": c.quality,
                "input_fidelity": c.input_fidelity, "max_side": c.max_side}

    def generate_settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"model": c.model, "size": c.size, "quality": c.quality, "moderation": c.moderation}

    def base_url(self) -> str:
        return (self.cfg.endpoint or "https://api.openai.com/v1").rstrip("/")

    def _key(self) -> str:
        key = os.environ.get(self.cfg.api_key_env, "").strip()
        if not key:
            raise CredentialsError(f"openai-images: no API key: set ${self.cfg.api_key_env} (it is read from the environment only)")
        return key

    def auth_headers(self, refresh: bool) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self._key()}"}
        for var, header in (("OPENAI_ORG_ID", "OpenAI-Organization"), ("OPENAI_PROJECT_ID", "OpenAI-Project")):
            if os.environ.get(var):
                h[header] = os.environ[var]
        return h

    def secrets(self) -> list[str]:
        return [os.environ.get(self.cfg.api_key_env, "").strip()]

    def _common(self) -> dict[str, str]:
        c = self.cfg
        f = {"model": c.model, "n": "1", "size": c.size}
        if c.quality:
            f["quality"] = c.quality
        if c.model.startswith("dall-e"):
            f["response_format"] = "b64_json"
        return f

    def _aspect(self) -> float | None:
        if self.cfg.size == "auto":
            return None
        w, h = (int(x) for x in self.cfg.size.split("x"))
        return w / h

    def edit_request(self, rgb: np.ndarray, record: dict[str, Any]) -> _Job:
        c = self.cfg
        h, w = rgb.shape[:2]
        # pad the source to the aspect of the size asked for (edge pixels), so that the answer maps back exactly
        a = self._aspect()
        top = left = 0
        padded = rgb
        if a is not None and abs(w / h - a) > 1e-3:
            pw, ph = (round(h * a), h) if w / h < a else (w, round(w / a))
            top, left = (ph - h) // 2, (pw - w) // 2
            padded = cv2.copyMakeBorder(rgb, top, ph - h - top, left, pw - w - left, cv2.BORDER_REPLICATE)
        ph, pw = padded.shape[:2]
        fields = {**self._common(), "prompt": render_prompt(c.prompt_template, record)}
        if c.input_fidelity:
            fields["input_fidelity"] = c.input_fidelity
        files = {"image": ("source.png", encode_png(fit_side(padded, c.max_side)), "image/png")}

        def finish(img: np.ndarray) -> np.ndarray:
            return resize(img, pw, ph)[top : top + h, left : left + w]

        return _Job(ApiRequest("/images/edits", fields=fields, files=files), finish)

    def generate_request(self, record: dict[str, Any]) -> _Job:
        body: dict[str, Any] = {**self._common(), "n": 1, "prompt": record.get("prompt", "")}
        if self.cfg.moderation:
            body["moderation"] = self.cfg.moderation
        return _Job(ApiRequest("/images/generations", json_body=body), lambda img: img)

    def read_answer(self, resp) -> bytes | SampleRejected:
        if resp.ok:
            try:
                data = resp.json().get("data") or []
            except (ValueError, AttributeError):
                raise ApiError(f"openai-images: the answer is not JSON: {resp.text[:200]!r}") from None
            for d in data:
                if isinstance(d, dict) and d.get("b64_json"):
                    return base64.b64decode(d["b64_json"])
            return SampleRejected("openai-images returned no image")
        try:
            body = resp.json()
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), dict) else {}
        code = err.get("code")
        if resp.status_code == 400 and (code in _OPENAI_REFUSALS or err.get("type") == "image_generation_user_error"):
            return SampleRejected(self.client.scrub(f"openai-images refused the request ({code}): {err.get('message', '')}"))
        if resp.status_code in (401, 403):
            raise CredentialsError(f"openai-images: the API key was refused ({self._error(resp)}); check ${self.cfg.api_key_env}")
        raise ApiError(f"openai-images ({self.cfg.model}): {self._error(resp)}")

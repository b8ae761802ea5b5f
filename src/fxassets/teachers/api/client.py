"""The HTTP client the API teachers share (`ApiClient`): concurrency, retries with backoff, the cost bound, the
credentials (from the environment only, scrubbed from every message).

Both share one client (`ApiClient`):
- at most `concurrency` requests in flight (a thread pool that lives as long as the teacher, one keep-alive HTTP
  session per thread);
- 408 / 429 / 5xx answers, timeouts and dropped connections are retried with exponential backoff and jitter
  (`backoff` doubling up to `max_backoff`), and a `Retry-After` (or OpenAI's `retry-after-ms`) is honoured;
  a 429 that says the account is out of quota (`insufficient_quota`) is not retried;
- a write-ahead response cache (`<cache>/api/<key>.img`, `$FXASSETS_CACHE` moves it): each image is stored the
  moment it arrives, keyed by a hash of the request (model, prompt, seed, source bytes, settings; never the
  credentials), so a run killed half way never pays twice for an image, even one whose batch had not finished;
  the stage's per-sample cache (`teachers/stage.py`) takes over once a batch is recorded there, and the entries of a
  run that ends normally are removed;
- a cost bound: `run_session(n)` estimates n uncached samples x the price of an image (`price_per_image`, else the
  model's listed price) and refuses to start over `max_cost`; during the run a request is only sent while spent +
  reserved + its price <= `max_cost` (a 2xx answer and a timed-out request count as spent, a 429 / 5xx / refused
  request does not), else the run stops (`BudgetExceeded`) once the requests in flight are back;
- a refused image (Gemini: a blocked prompt, a finish reason other than STOP, text but no image; OpenAI's
  `content_policy_violation` / `moderation_blocked`) becomes a `SampleRejected` with the provider's reason.

Credentials come only from the environment (Vertex AI: `$GOOGLE_OAUTH_ACCESS_TOKEN` or Application Default
Credentials through google-auth when installed; the Gemini API: `$GEMINI_API_KEY`; OpenAI: `$OPENAI_API_KEY`), are
sent only in a header (Authorization, or x-goog-api-key), and are scrubbed from every error message. The model
version is in the fingerprint; endpoint, concurrency, timeouts, retries and prices are not (they never change an
image). Request and response shapes: docs/api_teachers.md."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit


from fxassets.teachers.base import SampleRejected, TeacherError


log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 600.0  # seconds: a longer Retry-After is cut to this
GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


class ApiError(TeacherError):
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
        self.ledger = Ledger(cfg.price, cfg.max_cost)
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

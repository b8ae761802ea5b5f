"""What the API teachers share beyond HTTP: image encoding, the write-ahead response cache and `ApiTeacher` (the
sessions, cost bound, concurrency and caching around `ApiClient`, the model lifecycle check, the errors that stop a
run); `gemini.py` and `openai.py` build the requests and read the answers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import cv2
import numpy as np

from fxassets.core.api_config import LEGACY, family, retired
from fxassets.core.config import EffectTeacher
from fxassets.teachers.base import BatchTeacher, SampleRejected, TeacherError
from fxassets.core.paths import cache_root
from fxassets.core.images import resize
from fxassets.teachers.api.client import ApiClient, ApiError, ApiRequest, BudgetExceeded, CredentialsError, Ledger, _OverBudget

log = logging.getLogger(__name__)


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover
        raise ValueError("could not encode PNG")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray | None:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def fit_side(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """`rgb` shrunk so that its long side is at most `max_side` (aspect kept)."""
    h, w = rgb.shape[:2]
    s = max_side / max(h, w)
    return rgb if s >= 1 else resize(rgb, max(1, round(w * s)), max(1, round(h * s)))


def pad_to_aspect(rgb: np.ndarray, aspect: float | None) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """`rgb` padded (edge pixels) to width / height `aspect`, and the map of an answer (any size, that aspect) back onto
    `rgb`: resized to the padded size, the padding cropped off, so that the face lands where it was."""
    h, w = rgb.shape[:2]
    top = left = 0
    padded = rgb
    if aspect is not None and abs(w / h - aspect) > 1e-3:
        pw, ph = (round(h * aspect), h) if w / h < aspect else (w, round(w / aspect))
        top, left = (ph - h) // 2, (pw - w) // 2
        padded = cv2.copyMakeBorder(rgb, top, ph - h - top, left, pw - w - left, cv2.BORDER_REPLICATE)
    ph, pw = padded.shape[:2]
    return padded, lambda img: resize(img, pw, ph)[top : top + h, left : left + w]


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
        from fxassets.core.atomic import write_bytes

        write_bytes(self.path(key), data)

    def drop(self, keys: list[str]) -> None:
        for k in keys:
            self.path(k).unlink(missing_ok=True)


# -- the teachers ----------------------------------------------------------------------------------------------


@dataclass
class _Job:
    req: ApiRequest
    finish: Callable[[np.ndarray], np.ndarray]  # the decoded API image -> the sample's output


class ApiTeacher(BatchTeacher):
    face_scaled = False  # the provider works at the output size it is asked for, whatever the photo's size
    """Shared by the API teachers: sessions, cost bound, concurrency, caching. Subclasses build requests and read
    answers."""

    version = "1"
    api = ""  # "vertex-ai" | "openai"
    generates = True  # text-to-image for sources (fxassets generate-sources --from-params)

    def __init__(self, cfg, effect: EffectTeacher | None = None):
        if why := retired(cfg.model):  # before any request, whatever built the config
            raise ValueError(f"teacher.model: {why}")
        cfg.price  # noqa: B018 - raises when the model has no listed price and none is set
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
        return round(n * self.cfg.price, 6)

    @contextmanager
    def run_session(self, n_uncached: int) -> Iterator[None]:
        c = self.cfg
        est = self.estimate(n_uncached)
        if n_uncached and est > c.max_cost + 1e-9:
            raise BudgetExceeded(
                f"{self.kind}: {n_uncached} samples to request x {c.price:g} USD = {est:.2f} USD estimated, "
                f"over teacher.max_cost {c.max_cost:.2f} USD; nothing was requested. Raise teacher.max_cost, or lower "
                "effects.<name>.samples (cached samples cost nothing)")
        client = self.client
        client.ledger = Ledger(c.price, c.max_cost)  # the bound is per run
        with self._used_lock:
            self._used = []
        if n_uncached:
            self.auth_headers(False)  # fail before the first request when there are no credentials
            log.warning("%s: %d samples to request x %g USD = %.2f USD estimated (max_cost %.2f USD)",
                        self.kind, n_uncached, c.price, est, c.max_cost)
            if new := LEGACY.get(family(c.model)):
                log.warning("%s: %s is a legacy model (still served, not for new runs); the current one is %s", self.kind, c.model, new)
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

    def _run(self, jobs: list[_Job], records: list[dict[str, Any]]) -> list[np.ndarray | SampleRejected]:
        """All jobs through the pool; every answer that arrives is cached before a stop or an error is raised (an
        ApiError names the sample whose request failed)."""
        stop = threading.Event()
        errors: list[BaseException] = []
        over = [False]

        def work(job: _Job, rec: dict[str, Any]):
            try:
                return self._one(job, stop)
            except _OverBudget:
                over[0] = True
                stop.set()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other requests are back
                if isinstance(exc, TeacherError):
                    exc.sample = rec.get("sample_id")
                errors.append(exc)
                stop.set()
            return None

        outs = list(self.client.pool.map(work, jobs, records))
        if errors:
            raise errors[0]
        if over[0]:
            led = self.client.ledger
            raise BudgetExceeded(
                f"{self.kind}: stopped before exceeding teacher.max_cost {led.max_cost:.2f} USD: spent {led.spent:.2f} USD "
                f"({led.charged} requests x {led.price:g} USD, retries of timed-out requests included); the images "
                "already made are cached, raise max_cost and run again for the rest")
        return outs  # type: ignore[return-value]

    def edit_batch(self, images: list[np.ndarray], records: list[dict[str, Any]]) -> list[np.ndarray | SampleRejected]:
        return self._run([self.edit_request(img, rec) for img, rec in zip(images, records, strict=True)], records)

    def generate_batch(self, records: list[dict[str, Any]]) -> list[np.ndarray | SampleRejected]:
        return self._run([self.generate_request(rec) for rec in records], records)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def fail(self, resp, credentials: str) -> NoReturn:
        """Raise for a non-2xx answer that is not a refusal: the credentials (401 / 403, `credentials` says where they
        come from) or anything else, naming the model (a 404 or `model_not_found`: is it still served?)."""
        msg = self._error(resp)
        if resp.status_code in (401, 403):
            raise CredentialsError(f"{self.kind}: the credentials were refused ({msg}); check {credentials}")
        hint = "; is the model still served? (docs/api_teachers.md, 'Is the model still served')" if (
            resp.status_code == 404 or "model_not_found" in msg) else ""
        raise ApiError(f"{self.kind} ({self.cfg.model}): {msg}{hint}")

    def _error(self, resp) -> str:
        try:
            body = resp.json()
            err = body.get("error", body) if isinstance(body, dict) else body
            msg = err.get("message", "") if isinstance(err, dict) else str(err)
            status = (err.get("status") or err.get("code") or "") if isinstance(err, dict) else ""
        except ValueError:
            msg, status = resp.text[:300], ""
        return self.client.scrub(f"HTTP {resp.status_code} {status}: {msg}".strip())

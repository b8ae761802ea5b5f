"""Gemini image models through `generateContent` (`gemini-image`), on Vertex AI or the Gemini Developer API: request
and answer shapes in docs/api_teachers.md."""

from __future__ import annotations

import base64
import math
import os
import re
import threading
from typing import Any

import numpy as np

from fxassets.core.api_config import ASPECT_RATIOS
from fxassets.core.config import EffectTeacher, GeminiImageTeacher
from fxassets.teachers.base import SampleRejected
from fxassets.teachers.diffusers import render_prompt
from fxassets.teachers.api.base import ApiTeacher, _Job, encode_png, fit_side, pad_to_aspect
from fxassets.teachers.api.client import GOOGLE_SCOPE, ApiError, ApiRequest, CredentialsError

HARM_CATEGORIES = ("HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_DANGEROUS_CONTENT", "HARM_CATEGORY_HARASSMENT",
                   "HARM_CATEGORY_SEXUALLY_EXPLICIT")
_REFUSAL = re.compile(r"safety|blocked|prohibited|responsible ai|not allowed|violat", re.I)


def _ratio(r: str) -> float:
    a, b = r.split(":")
    return int(a) / int(b)


def nearest_aspect(w: int, h: int) -> str:
    """The supported aspect ratio closest to w / h (on a log scale: 2:1 and 1:2 are as far from 1:1)."""
    return min(ASPECT_RATIOS, key=lambda r: abs(math.log(w / h / _ratio(r))))


class GeminiImageTeacherImpl(ApiTeacher):
    """`POST {base}/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:generateContent` (Vertex
    AI) or `POST {base}/v1beta/models/{model}:generateContent` (Gemini API), one JSON body for both: `contents[0].parts`
    = the prompt as text and (edits) the source as an `inlineData` PNG, padded to the supported aspect ratio nearest
    its own; `generationConfig` = responseModalities ["IMAGE"], seed (best effort), imageConfig {aspectRatio,
    imageSize}; safetySettings when set. Answer: the last `inlineData` part of `candidates[0].content.parts` that is not
    a thought; a blocked prompt, a finish reason other than STOP, or text without an image is a rejected sample."""

    kind = "gemini-image"
    cfg: GeminiImageTeacher

    def __init__(self, cfg: GeminiImageTeacher, effect: EffectTeacher | None = None):
        super().__init__(cfg, effect)
        self.api = cfg.service
        self._creds = None
        self._creds_lock = threading.Lock()

    def settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"model": c.model, "prompt_template": c.prompt_template, "image_size": c.image_size,
                "safety_threshold": c.safety_threshold, "max_side": c.max_side}

    def generate_settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"model": c.model, "aspect_ratio": c.aspect_ratio, "image_size": c.image_size, "safety_threshold": c.safety_threshold}

    def base_url(self) -> str:
        c = self.cfg
        if c.endpoint:
            return c.endpoint.rstrip("/")
        if c.service == "gemini-api":
            return "https://generativelanguage.googleapis.com"
        return "https://aiplatform.googleapis.com" if c.location == "global" else f"https://{c.location}-aiplatform.googleapis.com"

    def _path(self) -> str:
        c = self.cfg
        if c.service == "gemini-api":
            return f"/v1beta/models/{c.model}:generateContent"
        return f"/v1/projects/{c.project}/locations/{c.location}/publishers/google/models/{c.model}:generateContent"

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
                        f"gemini-image: no credentials: set ${self.cfg.token_env} to an access token (for example "
                        f"`export {self.cfg.token_env}=$(gcloud auth print-access-token)`), or `pip install google-auth` and "
                        "set up Application Default Credentials (`gcloud auth application-default login`, or "
                        "GOOGLE_APPLICATION_CREDENTIALS=<service account key file>), or use service: gemini-api") from None
                try:
                    self._creds, _ = google.auth.default(scopes=[GOOGLE_SCOPE])
                except DefaultCredentialsError as exc:
                    raise CredentialsError(f"gemini-image: no Application Default Credentials and ${self.cfg.token_env} is unset: {exc}") from None
            creds = self._creds
            if refresh or not creds.valid:
                import google.auth.transport.requests

                creds.refresh(google.auth.transport.requests.Request())
            return creds.token

    def auth_headers(self, refresh: bool) -> dict[str, str]:
        if self.cfg.service == "vertex-ai":
            return {"Authorization": f"Bearer {self._token(refresh)}"}
        key = os.environ.get(self.cfg.api_key_env, "").strip()
        if not key:
            raise CredentialsError(f"gemini-image: no API key: set ${self.cfg.api_key_env} (a Gemini API key; it is read from the environment only)")
        return {"x-goog-api-key": key}

    def secrets(self) -> list[str]:
        out = [os.environ.get(self.cfg.token_env, "").strip(), os.environ.get(self.cfg.api_key_env, "").strip()]
        if self._creds is not None and getattr(self._creds, "token", None):
            out.append(self._creds.token)
        return out

    def _credentials(self) -> str:
        c = self.cfg
        if c.service == "gemini-api":
            return f"${c.api_key_env}"
        return f"${c.token_env} or your ADC, and that they may use Vertex AI in project {c.project}"

    # -- requests ---------------------------------------------------------------------------------------------
    def _request(self, parts: list[dict[str, Any]], record: dict[str, Any], aspect: str) -> ApiRequest:
        c = self.cfg
        image_config = {"aspectRatio": aspect, **({"imageSize": c.image_size} if c.image_size else {})}
        body: dict[str, Any] = {
            "contents": [{"role": "user", "parts": parts}],
            "generationConfig": {"responseModalities": ["IMAGE"], "seed": int(record["seed"]) % 2**31, "imageConfig": image_config},
        }
        if c.safety_threshold:
            body["safetySettings"] = [{"category": k, "threshold": c.safety_threshold} for k in HARM_CATEGORIES]
        return ApiRequest(self._path(), json_body=body)

    def edit_request(self, rgb: np.ndarray, record: dict[str, Any]) -> _Job:
        h, w = rgb.shape[:2]
        aspect = nearest_aspect(w, h)
        padded, finish = pad_to_aspect(rgb, _ratio(aspect))
        data = base64.b64encode(encode_png(fit_side(padded, self.cfg.max_side))).decode()
        parts = [{"text": render_prompt(self.cfg.prompt_template, record)}, {"inlineData": {"mimeType": "image/png", "data": data}}]
        return _Job(self._request(parts, record, aspect), finish)

    def generate_request(self, record: dict[str, Any]) -> _Job:
        return _Job(self._request([{"text": record.get("prompt", "")}], record, self.cfg.aspect_ratio), lambda img: img)

    @staticmethod
    def _why(what: str, message: Any, ratings: Any) -> SampleRejected:
        blocked = [r.get("category", "?") for r in ratings or [] if isinstance(r, dict) and r.get("blocked")]
        return SampleRejected(f"gemini-image {what}" + (f": {message}" if message else "") + (f" (blocked: {', '.join(blocked)})" if blocked else ""))

    def read_answer(self, resp) -> bytes | SampleRejected:
        if not resp.ok:
            msg = self._error(resp)
            if resp.status_code == 400 and _REFUSAL.search(msg):
                return SampleRejected(f"gemini-image refused the request: {msg}")
            self.fail(resp, self._credentials())
        try:
            body = resp.json()
            feedback, candidates = body.get("promptFeedback") or {}, body.get("candidates") or [{}]
        except (ValueError, AttributeError):
            raise ApiError(f"gemini-image: the answer is not JSON: {resp.text[:200]!r}") from None
        if feedback.get("blockReason"):
            return self._why(f"blocked the prompt ({feedback['blockReason']})", feedback.get("blockReasonMessage"), feedback.get("safetyRatings"))
        cand = candidates[0]
        reason = cand.get("finishReason", "STOP")
        if reason != "STOP":
            return self._why(f"stopped with finishReason {reason}", cand.get("finishMessage"), cand.get("safetyRatings"))
        parts = [p for p in (cand.get("content") or {}).get("parts") or [] if isinstance(p, dict) and not p.get("thought")]
        images = [d["data"] for p in parts if isinstance(d := p.get("inlineData") or p.get("inline_data"), dict) and d.get("data")]
        if images:
            return base64.b64decode(images[-1])
        text = " ".join(p["text"] for p in parts if isinstance(p.get("text"), str)).strip()
        return SampleRejected("gemini-image answered with no image" + (f", only text: {text[:200]!r}" if text else ""))

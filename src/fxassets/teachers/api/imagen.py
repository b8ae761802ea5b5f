"""Google Imagen on Vertex AI (`imagen`): request and answer shapes in docs/api_teachers.md."""

from __future__ import annotations

import base64
import os
import re
import threading
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from fxassets.core.config import EffectTeacher, ImagenTeacher
from fxassets.teachers.base import SampleRejected
from fxassets.teachers.diffusers import render_prompt
from fxassets.core.images import resize
from fxassets.teachers.api.base import ApiTeacher, _Job, encode_png, fit_side
from fxassets.teachers.api.client import GOOGLE_SCOPE, ApiError, ApiRequest, CredentialsError


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

"""OpenAI's images API (`openai-images`): request and answer shapes in docs/api_teachers.md."""

from __future__ import annotations

import base64
import os
from typing import Any

import cv2
import numpy as np

from fxassets.core.config import OpenAIImagesTeacher
from fxassets.teachers.base import SampleRejected
from fxassets.teachers.diffusers import render_prompt
from fxassets.core.images import resize
from fxassets.teachers.api.base import ApiTeacher, _Job, encode_png, fit_side
from fxassets.teachers.api.client import ApiError, ApiRequest, CredentialsError


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

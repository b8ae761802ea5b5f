"""OpenAI's images API (`openai-images`): request and answer shapes in docs/api_teachers.md."""

from __future__ import annotations

import base64
import os
from typing import Any

import numpy as np

from fxassets.core.config import OpenAIImagesTeacher
from fxassets.teachers.base import SampleRejected
from fxassets.teachers.diffusers import render_prompt
from fxassets.teachers.api.base import ApiTeacher, _Job, encode_png, fit_side, pad_to_aspect
from fxassets.teachers.api.client import ApiError, ApiRequest, CredentialsError


# -- OpenAI images -------------------------------------------------------------------------------------------------

_OPENAI_REFUSALS = ("content_policy_violation", "moderation_blocked")


class OpenAIImagesTeacherImpl(ApiTeacher):
    """`POST {endpoint}/images/edits` (multipart: `image[]` = the source as PNG, prompt, model, n, size, quality,
    output_format, input_fidelity, moderation) and `POST {endpoint}/images/generations` (JSON: the same fields but the
    image and input_fidelity); answer `data[0].b64_json` (gpt-image models always answer base64). A refusal is a 400
    with `error.code` content_policy_violation or moderation_blocked. No seed: the API takes none."""

    kind = "openai-images"
    api = "openai"
    cfg: OpenAIImagesTeacher

    def settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"model": c.model, "prompt_template": c.prompt_template, "size": c.size, "quality": c.quality,
                "input_fidelity": c.input_fidelity, "output_format": c.output_format, "moderation": c.moderation, "max_side": c.max_side}

    def generate_settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"model": c.model, "size": c.size, "quality": c.quality, "output_format": c.output_format, "moderation": c.moderation}

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
        f = {"model": c.model, "n": "1", "size": c.size, "output_format": c.output_format}
        for name in ("quality", "moderation"):
            if getattr(c, name):
                f[name] = getattr(c, name)
        return f

    def _aspect(self) -> float | None:
        if self.cfg.size == "auto":
            return None
        w, h = (int(x) for x in self.cfg.size.split("x"))
        return w / h

    def edit_request(self, rgb: np.ndarray, record: dict[str, Any]) -> _Job:
        c = self.cfg
        padded, finish = pad_to_aspect(rgb, self._aspect())  # the answer maps back onto the source exactly
        fields = {**self._common(), "prompt": render_prompt(c.prompt_template, record)}
        if c.input_fidelity:
            fields["input_fidelity"] = c.input_fidelity
        files = {"image[]": ("source.png", encode_png(fit_side(padded, c.max_side)), "image/png")}
        return _Job(ApiRequest("/images/edits", fields=fields, files=files), finish)

    def generate_request(self, record: dict[str, Any]) -> _Job:
        body: dict[str, Any] = {**self._common(), "n": 1, "prompt": record.get("prompt", "")}
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
        self.fail(resp, f"${self.cfg.api_key_env}")

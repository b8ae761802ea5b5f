"""The mobile model's card (`data/mobile/E/MODEL_CARD.md`): what the model does, its files, sizes, where its latency
is found, int8 parity, quality against the teacher and the do-nothing baseline, the student, the training data
(pairs, people, the source photos' license and attribution), the teacher fingerprint and the before / teacher /
student grid.  No clock in it: the same inputs give the same bytes.

Everything comes from files the pipeline already wrote; a missing input leaves its section saying so rather than
failing the stage.  `render_model_card` is pure (dicts in, markdown out); `write_model_card` gathers and writes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fxassets.core.atomic import write_text

SOURCE_FILE = "SOURCE.md"
# "CC BY 4.0", "CC BY-SA 4.0", "CC0 1.0", "Apache-2.0", "MIT": the first one found in the license paragraph
_LICENSE = re.compile(r"\b(CC[ -]BY(?:[ -](?:SA|NC|ND))*(?:[ -]\d\.\d)?|CC0(?:[ -]\d\.\d)?|Apache[ -]2\.0|MIT|"
                      r"BSD-\d-Clause|ODbL(?:[ -]\d\.\d)?)\b")


def _load_json(path: Path | None) -> dict[str, Any] | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def source_license(faces_dir: Path | None) -> dict[str, Any]:
    """The license of the source photos, from `SOURCE.md` in `faces_dir`: `license` (e.g. "CC BY 4.0", or None),
    `attribution` (the paragraphs about the license, attribution and changes made), `limits` (about consent),
    `file` (the path read, or None when there is none)."""
    path = Path(faces_dir) / SOURCE_FILE if faces_dir else None
    if path is None or not path.is_file():
        return {"file": None, "license": None, "attribution": [], "limits": []}
    text = path.read_text(encoding="utf-8", errors="replace")
    paras = [" ".join(line.strip() for line in p.splitlines()) for p in re.split(r"\n\s*\n", text)]
    paras = [p for p in paras if p and not p.startswith("#")]
    attribution = [p for p in paras if re.search(r"licen[cs]|attribut|chang", p, re.I)]  # CC BY: say what changed
    limits = [p for p in paras if re.search(r"consent", p, re.I) and p not in attribution]
    found = next((m.group(1) for p in attribution for m in [_LICENSE.search(p.replace("*", ""))] if m), None)
    return {"file": str(path), "license": found, "attribution": attribution, "limits": limits}


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _f(v: Any, fmt: str = ".2f", unit: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{unit}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _targets_section(report: Mapping[str, Any], files: Mapping[str, str]) -> list[str]:
    """The runtimes of `export.targets` beside the ORT model: status, file, size, parity, ops left in float."""
    targets = {k: v for k, v in (report.get("targets") or {}).items() if k != "ort"}
    if not targets:
        return []
    rows = []
    for name, t in targets.items():
        fl = t.get("float_ops") or {}
        rows.append([name, f"`{files.get(name, t.get('file', '-'))}`" if t.get("file") else "-", t["status"],
                     _mb(t.get("bytes")), _f(t.get("parity_psnr_db"), ".1f", " dB"),
                     _f(t.get("parity_min_psnr_db"), ".1f", " dB"),
                     t.get("reason", "") if t["status"] in ("skipped", "unverified")
                     else ", ".join(f"{k} {v}" for k, v in fl.items()) or "-"])
    return ["## Other runtimes (`export.targets`)", "",
            "Built from the same student, int8, calibrated on the same train crops; parity against the fp32 "
            f"ONNX output on the same held-out pairs (gate {_f(report.get('min_parity_db'), '.1f')} dB: below it a "
            "target is reported failed and kept; only the ONNX Runtime model gates the stage).", "",
            *_table(["target", "file", "status", "size", "parity", "worst pair", "ops in float (or why not)"],
                    rows), ""]


def render_model_card(
    *, effect: str, report: Mapping[str, Any], student: Mapping[str, Any], files: Mapping[str, str],
    train_metrics: Mapping[str, Any] | None = None, pairs_summary: Mapping[str, Any] | None = None,
    people: Mapping[str, int] | None = None, teacher: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
) -> str:
    """The card as markdown.  `report`: export_mobile's report; `student`: encoder, width, params (and, from the
    checkpoint, steps / train settings); `files`: file name (relative to the card) per key fp32, int8, ort, grid
    and report; `train_metrics`: the student_checkpoint stage's metrics.json; `pairs_summary`: face_pairs'
    summary.json; `people`: distinct people per split among the kept pairs; `teacher`: teacher.json;
    `source`: `source_license(...)`."""
    tm = dict(train_metrics or {})
    size = report.get("size")
    fb = report.get("float_fallback") or {}
    in_float = report.get("nodes_in_float") or []
    versions = report.get("versions", {})
    L: list[str] = []
    L += [f"# `{effect}` face effect: mobile student", ""]
    params = student.get("params") or tm.get("params")
    L += [
        f"A {params:,}-parameter student network ({student.get('encoder', '?')} encoder, decoder width "
        f"{student.get('width', '?')}) distilled from "
        + (f"the `{teacher.get('kind')}` teacher" if teacher else "a teacher")
        + (f" (style `{teacher['style']}`)" if teacher and teacher.get("style") else "")
        + f". It applies the *{effect}* effect to one aligned {size}x{size} face crop.", "",
        f"- input `image`: 1x3x{size}x{size} float32 RGB in [0, 1] (the face aligned to the canonical template);",
        f"- output `output`: the same shape, the edited crop (`clamp(input + edit, 0, 1)`).",
        "- on a frame: detect the face, align it, run the model, blend the crop back "
        "(`fxassets apply --effect " + effect + "`, `fxassets.runtime.EffectRunner`).", "",
    ]

    L += ["## Files", ""]
    L += _table(["file", "what", "size"], [
        [f"`{files['fp32']}`", f"ONNX, float32, opset {report.get('opset')}", _mb(report.get("fp32_bytes"))],
        [f"`{files['int8']}`", "ONNX, int8 QDQ: per-channel int8 weights, uint8 activations"
         + (f"; {len(in_float)} nodes kept in float" if in_float else ""), _mb(report.get("int8_bytes"))],
        [f"`{files['ort']}`", "ONNX Runtime mobile format (the int8 model, optimizations fixed, target "
         f"{(report.get('ort') or {}).get('target_platform') or 'any'})", _mb(report.get("ort_bytes"))],
        [f"`{files['report']}`", "every figure below, per held-out pair too", ""],
    ])
    ops = (report.get("ort") or {}).get("ops")
    if ops:
        L += ["", "Operators a reduced ONNX Runtime build needs for the `.ort` file (`--include_ops_by_config`):", ""]
        L += ["```", *ops, "```"]
    L += [""]
    L += _targets_section(report, files)

    L += ["## Latency", ""]
    L += ["Not in this card: a time belongs to the machine that measured it, and the card is a build output that "
          "a rerun reproduces byte for byte. `fxassets report` prints the build's int8 and fp32 times at 1 thread "
          f"(from the stage's run log, `.cache/fxassets/runs/mobile_model/{effect}.json`, with the CPU); "
          f"`fxassets bench --effect {effect}` measures this machine (fp32 / int8, 1 and 2 threads, the 1280x720 "
          "runtime).", ""]

    gate = report.get("min_parity_db")
    L += ["## int8 parity", ""]
    L += [f"PSNR of the int8 output against the fp32 output, {report.get('heldout_pairs')} held-out pairs: mean "
          f"{_f(report.get('parity_psnr_db'), '.1f')} dB, worst pair {_f(report.get('parity_min_psnr_db'), '.1f')} dB "
          f"(`.ort`: {_f(report.get('ort_parity_psnr_db'), '.1f')} dB). Gate: at least {_f(gate, '.1f')} dB: "
          f"**{'passed' if report.get('parity_ok') else 'FAILED'}**.", ""]
    L += [f"Calibration: {report.get('calibration_method')} on {report.get('calibration_samples')} train crops."]
    rounds = [r for r in fb.get("rounds", []) if r.get("round", 0) > 0]
    if rounds:
        L += ["", "Float fallback (onnxruntime's `qdq_loss_debug` ranks the activations by how much their int8 "
              "rounding hurts the layers that read them; the most harmful stay in float):", ""]
        trs = [["0", "-", "-", _f(fb["rounds"][0].get("parity_psnr_db"), ".2f")]]
        for r in rounds:
            if "stopped" in r:
                trs.append([str(r["round"]), r["stopped"], "-", "-"])
            else:
                trs.append([str(r["round"]), f"`{r['kept_float']['tensor']}`",
                            ", ".join(f"`{n}`" for n in r["nodes_added"]), _f(r.get("parity_psnr_db"), ".2f")])
        L += _table(["round", "kept in float", "nodes", "parity dB"], trs)
        L += ["", f"Shipped: round {fb.get('chosen_round')}, {len(in_float)} nodes in float."]
    L += [""]

    L += ["## Quality on held-out people", ""]
    L += ["Against the teacher's output (PSNR in dB, SSIM), on people the student never saw; the unchanged input "
          "is the do-nothing baseline.", ""]
    qrows = []
    if tm:
        qrows += [["student, PyTorch fp32 (training evaluation)", _f(tm.get("heldout_psnr")),
                   _f(tm.get("heldout_ssim"), ".3f")],
                  ["unchanged input (training evaluation)", _f(tm.get("identity_psnr")),
                   _f(tm.get("identity_ssim"), ".3f")]]
    qrows += [["student, ONNX fp32 (export)", _f(report.get("fp32_psnr_db")), "-"],
              ["student, ONNX int8 (export)", _f(report.get("int8_psnr_db")), "-"],
              ["unchanged input (export)", _f(report.get("identity_psnr_db")), "-"]]
    L += _table(["model", "PSNR", "SSIM"], qrows)
    L += ["", "![before / teacher / student int8 on held-out people](" + files["grid"] + ")", "",
          f"*{files['grid']}: one held-out person a row; columns: before, teacher, student int8.*", ""]

    L += ["## Student", ""]
    srows = [["encoder", f"`{student.get('encoder', '?')}` (timm, random init)"],
             ["decoder width", str(student.get("width", "?"))], ["parameters", f"{params:,}" if params else "-"]]
    if tm:
        srows += [["training steps", str(tm.get("steps", "-"))]]
    L += _table(["", ""], srows)
    L += [""]

    L += ["## Training data", ""]
    ps = dict(pairs_summary or {})
    drows = []
    if ps:
        rej = ps.get("rejected_by_reason") or {}
        drows += [["pairs kept / rejected", f"{ps.get('kept', '-')} / {ps.get('rejected', '-')}"
                   + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(rej.items())) + ")" if rej else "")],
                  ["train / held-out pairs", f"{ps.get('train_pairs', '-')} / {ps.get('heldout_pairs', '-')}"]]
    if people:
        drows += [["people (train / held-out)", f"{people.get('train', 0)} / {people.get('heldout', 0)}, "
                   "split by person"]]
    src = dict(source or {})
    drows += [["source photos license", src.get("license") or ("see " + src["file"] if src.get("file")
                                                               else "unknown (no SOURCE.md beside the photos)")]]
    L += _table(["", ""], drows)
    if src.get("attribution"):
        L += ["", f"From `{src['file']}`:", ""]
        for p in src["attribution"]:
            L += [f"> {p}", ">"]
        L.pop()
    if src.get("limits"):
        L += [""]
        for p in src["limits"]:
            L += [f"> {p}", ">"]
        L.pop()
    L += ["", "The targets are the teacher's outputs on these photos, aligned and filtered by the face-pair quality "
          "gate (docs/quality.md).", ""]

    L += ["## Teacher fingerprint", ""]
    if teacher:
        L += ["The student imitates exactly this teacher; a different fingerprint means a different model.", ""]
        L += _table(["", ""], [[f"`{k}`", f"`{v}`"] for k, v in sorted(teacher.items())])
    else:
        L += ["unknown (no teacher.json given)"]
    L += [""]

    L += ["## Limits", ""]
    L += ["- Quality is measured against the teacher, not against people's judgement, and on few held-out people.",
          "- One aligned, roughly frontal face per crop; the runtime skips frames where no face is found.",
          "- Latency depends on the machine (a phone's differs from the build machine's); parity and quality do not.",
          ""]
    L += [f"Built with torch {versions.get('torch', '?')}, onnx {versions.get('onnx', '?')}, onnxruntime "
          f"{versions.get('onnxruntime', '?')}.", ""]
    return "\n".join(L)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def write_model_card(path: Path, report: Mapping[str, Any], *, effect: str, meta: Mapping[str, Any],
                     files: Mapping[str, Path], train_metrics: Path | None = None, pairs_dir: Path | None = None,
                     pairs: Any = None, teacher_json: Path | None = None, faces_source: Path | None = None) -> str:
    """Gather the card's inputs and write it (atomically) to `path`; returns the markdown.

    `meta`: the checkpoint's metadata; `files`: paths of fp32, int8, ort, grid and report (linked relative to the
    card); `pairs`: the kept pairs (DataFrame with `split`, `person_id`) to count people; `pairs_dir` holds
    `summary.json`."""
    path = Path(path)
    tm = _load_json(train_metrics) or dict(meta.get("metrics") or {})
    student = dict(report.get("student") or {})
    for k in ("encoder", "width"):
        student.setdefault(k, meta.get(k))
    people = None
    if pairs is not None and len(pairs):
        people = {str(k): int(v) for k, v in pairs.groupby("split")["person_id"].nunique().items()}
    text = render_model_card(
        effect=effect, report=report, student=student,
        files={k: _rel(Path(v), path.parent) for k, v in files.items()},
        train_metrics=tm, pairs_summary=_load_json(Path(pairs_dir) / "summary.json") if pairs_dir else None,
        people=people, teacher=_load_json(teacher_json), source=source_license(faces_source),
    )
    write_text(path, text)
    return text

"""`fxassets apply` and `fxassets bench` on the tiny built project: images, folders, video, lost faces, --aligned."""

import json

import cv2
import numpy as np
import pytest

from conftest import run
from fxassets.core.images import read_rgb

pytestmark = pytest.mark.slow


def test_apply_image_changes_the_face_only(built_project, tmp_path):
    root = built_project
    src = root / "data/samples/faces/faces_010.jpg"
    out = tmp_path / "out.png"
    res = json.loads(run(root, "fxassets", "apply", "--effect", "cartoon", "--input", str(src), "--output", str(out)).stdout)
    assert res["frames"] == 1 and res["frames_with_face"] == 1 and res["total_ms_median"] > 0
    a, b = read_rgb(src), read_rgb(out)
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b).sum(-1)
    h, w = diff.shape
    assert diff[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean() > 2  # the face changed
    assert diff[:, :10].max() == 0 and diff[:, -10:].max() == 0  # the frame's edges did not


def test_apply_folder_video_and_aligned(built_project, tmp_path):
    root = built_project
    folder = tmp_path / "in"
    folder.mkdir()
    face = cv2.imread(str(root / "data/samples/faces/faces_011.jpg"))
    cv2.imwrite(str(folder / "face.jpg"), face)
    cv2.imwrite(str(folder / "blank.png"), np.full((200, 300, 3), 90, np.uint8))
    (folder / "broken.jpg").write_bytes(b"not an image")
    res = json.loads(run(root, "fxassets", "apply", "--effect", "sketch", "--input", str(folder), "--output", str(tmp_path / "o")).stdout)
    assert res["frames"] == 2 and res["frames_passed_through"] == 1
    blank_out = cv2.imread(str(tmp_path / "o" / "blank.png"))
    assert np.array_equal(blank_out, np.full((200, 300, 3), 90, np.uint8))  # no face: unchanged

    # a 6-frame video whose middle frames lose the face
    video = tmp_path / "clip.mp4"
    small = cv2.resize(face, (320, 320))
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (320, 320))
    for i in range(6):
        vw.write(small if i not in (2, 3) else np.full_like(small, 128))
    vw.release()
    out = tmp_path / "clip_out.mp4"
    res = json.loads(run(root, "fxassets", "apply", "--effect", "cartoon", "--input", str(video), "--output", str(out), "--engine", "fp32").stdout)
    assert res["frames"] == 6 and res["frames_passed_through"] == 2
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 320
    cap.release()

    crops = tmp_path / "crops"
    run(root, "fxassets", "apply", "--effect", "cartoon", "--input", str(folder / "face.jpg"), "--output", str(crops), "--aligned", "--engine", "teacher")
    (crop,) = crops.glob("*.png")
    assert cv2.imread(str(crop)).shape == (256, 256, 3)


def test_apply_errors_name_the_problem(built_project, tmp_path):
    proc = run(built_project, "fxassets", "apply", "--effect", "nope", "--input", "x.jpg", "--output", str(tmp_path / "o.png"), check=False)
    assert proc.returncode == 2 and "unknown effect 'nope'" in proc.stderr
    proc = run(built_project, "fxassets", "apply", "--effect", "cartoon", "--input", str(tmp_path / "missing.jpg"), "--output", str(tmp_path / "o.png"), check=False)
    assert proc.returncode == 2 and "missing.jpg" in proc.stderr


def test_bench_reports_the_figures(built_project, tmp_path):
    out = tmp_path / "bench.json"
    run(built_project, "fxassets", "bench", "--effect", "cartoon", "--runs", "5", "--frames", "3", "--json", str(out))
    doc = json.loads(out.read_text())
    for key in ("student_fp32_ms_1t", "student_int8_ms_1t", "student_fp32_ms_2t", "student_int8_ms_2t", "runtime_720p_ms_1t", "fp32_bytes", "int8_bytes"):
        assert doc[key] > 0, key
    assert doc["int8_bytes"] < doc["fp32_bytes"]
    for key in ("student_int8_cpu_ms_1t", "runtime_720p_cpu_ms_1t", "runtime_720p_video_ms_1t", "runtime_720p_video_cpu_ms_1t"):
        assert doc[key] > 0, key
    assert doc["runtime_720p_video_breakdown_ms_1t"]["track"] > 0  # the clip is tracked between detections
    assert "QLinearConv" in doc["student_int8_op_ms_1t"] and "Conv" in doc["student_fp32_op_ms_1t"]
    tracking = doc["video_tracking"]
    assert tracking["frames"] == 150 and tracking["frames_lost"] == 0 and tracking["refound_after_frames"] == [0]
    # the machine beside the figures: CPU model, the int8-relevant ISA extensions, the runtime version
    assert doc["cpu"]["model"] and isinstance(doc["cpu"]["isa"], list) and doc["cpu"]["onnxruntime"]

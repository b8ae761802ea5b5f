"""Video: the One Euro filter, the Face Mesh keypoints, the tracker on a synthetic clip with a known path, and the
runtime and `apply` on clips with no face, a face leaving and coming back, and a frame that cannot be decoded."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fxassets.cli import apply as apply_cli
from fxassets.core.config import FacesConfig
from fxassets.core.images import read_rgb
from fxassets.faces.align import ALIGN_KEYPOINTS
from fxassets.faces.detect import FaceDetector
from fxassets.runtime import STAGES, EffectRunner
from fxassets.synthetic_clip import SyntheticClip, track_figures
from fxassets.tracking import FaceMesh, FaceTracker, OneEuro, eye_frame, mesh_keypoints, roi_from_face

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples" / "faces"
SHORT = {"still": 8, "moving": 30, "out": 3, "back": 5}  # a 46-frame clip: every stretch, motion twice as fast


def _photo(i: int = 0) -> np.ndarray:
    return read_rgb(SAMPLES / f"faces_{i:03d}.jpg")


def _keypoints(face) -> np.ndarray:
    return np.array([face.keypoints[k] for k in ALIGN_KEYPOINTS])


@pytest.fixture(scope="module")
def detector():
    with FaceDetector() as det:
        yield det


def test_one_euro_smooths_a_still_signal_and_follows_a_fast_one():
    rng = np.random.default_rng(0)
    t = np.arange(120) / 30.0
    noisy = 100 + rng.normal(0, 1.0, t.size)  # px; the speed term is in eye distances (here 100 px) per second
    f = OneEuro(min_cutoff=1.0, beta=30.0, d_cutoff=5.0)
    still = np.array([f(np.array([x]), s, scale=100.0)[0] for x, s in zip(noisy, t)])
    assert np.std(np.diff(still[10:])) < 0.7 * np.std(np.diff(noisy[10:]))
    ramp = 300.0 * t  # 300 px/s (a few eye distances a second)
    lag = {}
    for beta in (0.0, 30.0):
        f = OneEuro(min_cutoff=1.0, beta=beta, d_cutoff=5.0)
        lag[beta] = ramp[-1] - [f(np.array([x]), s, scale=100.0)[0] for x, s in zip(ramp, t)][-1]
    assert lag[30.0] < 0.2 * lag[0.0]  # the cutoff rises with speed: far less lag
    f.reset()
    assert f(np.array([5.0]), 0.0)[0] == 5.0  # after a reset the first value passes as it is


def test_mesh_keypoints_follow_the_detectors_convention(detector):
    mesh = FaceMesh()
    for i in (0, 10, 50):
        photo = _photo(i)
        (face,) = detector.detect(photo)
        lm, presence = mesh(photo, roi_from_face(face))
        assert lm.shape == (468, 2) and presence > 0.9
        det = _keypoints(face)
        iod = eye_frame(det)[2]
        assert np.linalg.norm(mesh_keypoints(lm) - det, axis=1).max() < 0.08 * iod
    blank = np.full((512, 512, 3), 120, np.uint8)
    assert mesh(blank, (256.0, 256.0, 300.0, 0.0))[1] < 0.5  # no face: a low presence


def test_tracker_on_the_synthetic_clip_detects_once_per_appearance(detector):
    photo = _photo()
    truth = _keypoints(detector.detect(photo)[0])
    clip = SyntheticClip(photo, segments=SHORT)
    with FaceTracker() as tracker:
        steps = [tracker.update(clip.frame(i), clip.t(i)) for i in range(len(clip))]
        assert tracker.update(np.zeros((4, 4), np.float32), 9.9).face is None and tracker.roi is None  # unreadable
    detected = [i for i, s in enumerate(steps) if s.detected]
    assert detected == [0, *clip.out, clip.back.start]  # the first frame, the frames out of view, the return
    assert all(s.ms["detect"] == 0 and s.ms["track"] > 0 for i, s in enumerate(steps) if i not in detected)
    tracked = [None if s.face is None else _keypoints(s.face) for s in steps]
    fig = track_figures(clip, truth, tracked, [s.raw for s in steps])
    assert fig["frames_lost"] == 0 and fig["false_faces"] == 0 and fig["refound_after_frames"] == [0]
    assert fig["landmark_error_iod_max"] < 0.06
    assert fig["jitter_px"] < fig["jitter_px_raw"]  # the filter smooths the still stretch
    # a face that is not found is counted: lost frames, and found again only later
    late = [None if clip.back.start <= i < clip.back.start + 2 else k for i, k in enumerate(tracked)]
    fig = track_figures(clip, truth, late)
    assert fig["frames_lost"] == 2 and fig["refound_after_frames"] == [2]


# ---- the runtime and `apply` on video, with an in-process model --------------------------------------------------
def _negative_model(path: Path, size: int) -> Path:
    """A stand-in student: 1 - image (an effect nobody can miss)."""
    shape = [1, 3, size, size]
    graph = helper.make_graph(
        [helper.make_node("Sub", ["one", "image"], ["output"])], "negative",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    model = _negative_model(tmp_path_factory.mktemp("model") / "neg.onnx", 64)
    with EffectRunner(FacesConfig(crop_size=64), "fp32", model_path=model, track=True) as r:
        yield r


def test_runner_tracks_and_passes_faceless_frames_through(runner):
    clip = SyntheticClip(_photo(3), segments=SHORT)
    runner.tracker.reset()
    for i in range(len(clip)):
        frame = clip.frame(i)
        res = runner.process(frame, t=clip.t(i))
        assert set(res.ms) == {*STAGES, "total"}
        if i in clip.out:
            assert res.faces == 0 and res.frame is frame  # passed through, untouched
        else:
            assert res.faces == 1 and np.abs(res.frame.astype(int) - frame).mean() > 1
    assert res.ms["detect"] == 0 and res.ms["track"] > 0 and res.ms["model"] > 0


class _FakeCapture:
    """cv2.VideoCapture over a list of BGR frames; None: a frame the decoder cannot read."""

    frames: list = []

    def __init__(self, path: str):
        self.i = 0

    def isOpened(self) -> bool:
        return True

    def get(self, prop: int) -> float:
        return {cv2.CAP_PROP_FPS: 30.0, cv2.CAP_PROP_FRAME_COUNT: float(len(self.frames))}.get(prop, 0.0)

    def read(self):
        self.i += 1
        if self.i > len(self.frames) or self.frames[self.i - 1] is None:
            return False, None
        return True, self.frames[self.i - 1].copy()

    def release(self) -> None:
        pass


def _apply_video(runner, monkeypatch, tmp_path, frames) -> tuple[dict, list[np.ndarray]]:
    monkeypatch.setattr(_FakeCapture, "frames", [None if f is None else cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in frames])
    monkeypatch.setattr(cv2, "VideoCapture", _FakeCapture)
    runner.tracker.reset()
    out = tmp_path / "out.mp4"
    timings, faces, unreadable = apply_cli._video(runner, tmp_path / "in.mp4", out, aligned=False)
    monkeypatch.undo()
    cap = cv2.VideoCapture(str(out))
    written = []
    while (got := cap.read())[0]:
        written.append(cv2.cvtColor(got[1], cv2.COLOR_BGR2RGB))
    cap.release()
    return {**apply_cli.summarize(timings, faces), "frames_unreadable": unreadable}, written


def test_apply_video_with_no_face_a_face_that_leaves_and_a_corrupt_frame(runner, monkeypatch, tmp_path):
    clip = SyntheticClip(_photo(5), segments=SHORT)
    frames = [cv2.resize(clip.frame(i), (640, 360), interpolation=cv2.INTER_AREA) for i in range(len(clip))]
    mid = clip.moving.start + 3
    summary, written = _apply_video(runner, monkeypatch, tmp_path, frames[:mid] + [None] + frames[mid + 1:])
    assert summary["frames_unreadable"] == 1 and len(written) == len(frames)  # the clip completes, same length
    assert summary["frames"] == len(frames) - 1 and summary["frames_passed_through"] == len(clip.out)
    assert summary["track_ms_median"] > 0 and summary["detect_ms_p90"] > 0
    for i in clip.out:  # no face: the frame as it was (up to the codec)
        assert np.abs(written[i].astype(int) - frames[i]).mean() < 3
    assert np.abs(written[mid].astype(int) - written[mid - 1]).mean() < 3  # the unreadable frame: the previous one
    blank = [np.full((360, 640, 3), 90, np.uint8)] * 4
    summary, written = _apply_video(runner, monkeypatch, tmp_path, blank + [None])  # no face; a bad last frame
    assert summary["frames_passed_through"] == 4 and summary["frames_unreadable"] == 0 and len(written) == 4

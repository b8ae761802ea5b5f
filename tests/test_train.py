"""Resumable training, the training objective (LPIPS from a local file, PatchGAN) and the curve plots.

Tiny synthetic pairs from test_student.py, one torch thread, a few steps: seconds each.  No LPIPS weights are ever
downloaded: the tests save a random-weight LPIPS network to tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
import torch
from safetensors import safe_open

import fxassets.train.loop as train_mod
from fxassets.core.config import EffectConfig, Params, TrainConfig
from fxassets.train.losses import LPIPS, Objective, PatchDiscriminator, load_lpips
from fxassets.core.metrics import l1_ssim_loss
from fxassets.core.paths import EffectPaths
from fxassets.train.student import build_student
from fxassets.core.manifest import MANIFEST
from fxassets.train.loop import fit, load_split, seed_everything, train_student

from conftest import kill_at_first_checkpoint
from fxassets.train.state import run_key
from test_student import make_pairs, tiny_cfg

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"), n_train=6, n_held=2)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def resume_cfg(**kw) -> TrainConfig:
    return tiny_cfg(**{"steps": 6, "checkpoint_every": 2, "eval_every": 3, **kw})  # a checkpoint between evaluations


def run(pairs: Path, out: Path, cfg: TrainConfig, state: Path | None, **kw) -> dict:
    return train_student(pairs, cfg, out / "student.safetensors", out / "metrics.json", out / "curve.csv",
                         progress=False, state_dir=state, **kw)


def weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def interrupt_after(monkeypatch, steps: int) -> None:
    """Simulate a kill: the batch of step `steps + 1` raises KeyboardInterrupt (after the checkpoint of `steps`)."""
    real, calls = train_mod.random_batch, []

    def batch(*args, **kwargs):
        calls.append(1)
        if len(calls) > steps:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "random_batch", batch)


def checkpoints(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir()) if state.is_dir() else []


# ---------------------------------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("gan_weight", [0.0, 0.1])
def test_resume_after_interrupt_is_exact(pairs, tmp_path, monkeypatch, caplog, gan_weight):
    cfg = resume_cfg(gan_weight=gan_weight)
    full = run(pairs, tmp_path / "full", cfg, tmp_path / "state_full")
    assert full["resumed_from_step"] == 0 and not (tmp_path / "state_full").exists()  # deleted on success

    state = tmp_path / "state"
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        with pytest.raises(KeyboardInterrupt):
            run(pairs, tmp_path / "resumed", cfg, state)
    assert checkpoints(state) == ["step-00000004"]  # the older one (step 2) was replaced
    assert sorted(p.name for p in (state / "step-00000004").iterdir()) == ["meta.json", "model.safetensors",
                                                                           "state.pt"]
    assert not (tmp_path / "resumed" / "student.safetensors").exists()

    with caplog.at_level("INFO", logger="fxassets.train.state"):
        resumed = run(pairs, tmp_path / "resumed", cfg, state)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    assert f"resuming from step 4 ({state / 'step-00000004'})" in caplog.text
    assert not state.exists()
    assert_same_weights(tmp_path / "full" / "student.safetensors", tmp_path / "resumed" / "student.safetensors")
    # the curve carries over too: evaluations before and after the interruption, the same numbers
    assert (tmp_path / "full" / "curve.csv").read_text() == (tmp_path / "resumed" / "curve.csv").read_text()
    assert resumed["heldout_psnr"] == full["heldout_psnr"]


def test_checkpoint_of_another_run_is_ignored(pairs, tmp_path, monkeypatch, caplog):
    state = tmp_path / "state"
    first, other = resume_cfg(lr=3e-3), resume_cfg(lr=2e-3)
    run(pairs, tmp_path / "reference", other, None)

    def interrupted(cfg: TrainConfig, at: int) -> None:
        with monkeypatch.context() as m:
            interrupt_after(m, at)
            with pytest.raises(KeyboardInterrupt):
                run(pairs, tmp_path / "out", cfg, state)

    interrupted(first, 4)
    assert checkpoints(state) == ["step-00000004"]
    with caplog.at_level("INFO", logger="fxassets.train.state"):
        metrics = run(pairs, tmp_path / "out", other, state)  # another lr: starts from step 0
    assert metrics["resumed_from_step"] == 0 and "resuming" not in caplog.text
    assert not state.exists()
    assert_same_weights(tmp_path / "reference" / "student.safetensors", tmp_path / "out" / "student.safetensors")

    interrupted(first, 4)
    interrupted(other, 2)  # ignores the first run's checkpoint and replaces it with its own
    assert checkpoints(state) == ["step-00000002"] and "resuming" not in caplog.text
    with caplog.at_level("INFO", logger="fxassets.train.state"):
        metrics = run(pairs, tmp_path / "out", other, state)
    assert metrics["resumed_from_step"] == 2 and "resuming from step 2" in caplog.text
    assert_same_weights(tmp_path / "reference" / "student.safetensors", tmp_path / "out" / "student.safetensors")


def test_run_key_follows_config_pairs_and_weights(pairs, tmp_path):
    manifest = pairs / MANIFEST
    base = run_key(resume_cfg(), manifest)
    assert run_key(resume_cfg(), manifest) == base
    assert run_key(resume_cfg(lr=1e-3), manifest) != base
    assert run_key(resume_cfg(seed=1), manifest) != base
    other = tmp_path / MANIFEST
    other.write_bytes(manifest.read_bytes() + b"\0")
    assert run_key(resume_cfg(), other) != base
    lp = tmp_path / "lpips.pth"
    lp.write_bytes(b"a")
    with_lpips = run_key(resume_cfg(), manifest, lp)
    lp.write_bytes(b"b")
    assert with_lpips != base and run_key(resume_cfg(), manifest, lp) != with_lpips
    enc = tmp_path / "encoder.pth"
    enc.write_bytes(b"a")
    with_encoder = run_key(resume_cfg(), manifest, None, enc)
    enc.write_bytes(b"b")
    assert with_encoder != base and run_key(resume_cfg(), manifest, None, enc) != with_encoder


def test_time_budget_counts_the_seconds_before_a_resume(pairs, tmp_path, monkeypatch):
    """A resumed run with a wall-clock budget gets only what is left of it."""
    cfg = resume_cfg(steps=1000, max_seconds=600, checkpoint_every=2)
    state = tmp_path / "state"
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run(pairs, tmp_path / "a", cfg, state)
    path = state / "step-00000002" / "state.pt"
    saved = torch.load(path, weights_only=True)
    saved["elapsed"] = 600.0  # as if the budget was spent before the kill
    torch.save(saved, path)
    metrics = run(pairs, tmp_path / "a", cfg, state)
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 2 and metrics["train_seconds"] >= 600


SUBPROCESS_TRAIN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import fxassets.train.loop as T
    from fxassets.core.config import TrainConfig

    pairs, out, state, cfg_json = sys.argv[1:5]
    real, calls = T.random_batch, []

    def batch(*args, **kwargs):  # slow down after the second step, so that the test kills a run in progress
        calls.append(1)
        if len(calls) > 2:
            time.sleep(0.5)
        return real(*args, **kwargs)

    T.random_batch = batch
    cfg = TrainConfig.model_validate_json(cfg_json)
    out = Path(out)
    T.train_student(Path(pairs), cfg, out / "student.safetensors", out / "metrics.json", out / "curve.csv",
                    progress=False, state_dir=Path(state))
""")


def test_sigkilled_training_resumes_exactly(pairs, tmp_path):
    """A real kill: SIGKILL once the first checkpoint appears (maybe mid-write of the next), then resume."""
    cfg = resume_cfg(steps=8, checkpoint_every=1, eval_every=3)
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", SUBPROCESS_TRAIN, str(pairs), str(tmp_path / "killed"), str(state),
                             cfg.model_dump_json()], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_at_first_checkpoint(proc, state, 120, proc.stderr)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "student.safetensors").exists()

    resumed = run(pairs, tmp_path / "killed", cfg, state)
    assert 1 <= resumed["resumed_from_step"] < 8 and resumed["steps"] == 8
    assert not state.exists()
    run(pairs, tmp_path / "full", cfg, None)
    assert_same_weights(tmp_path / "full" / "student.safetensors", tmp_path / "killed" / "student.safetensors")


def test_stage_keeps_state_outside_the_outputs(tmp_path, monkeypatch):
    import fxassets.pairs.gate
    from fxassets.stages import stage_student_checkpoint

    seen = {}
    monkeypatch.delenv("FXASSETS_CACHE", raising=False)
    monkeypatch.setattr(fxassets.pairs.gate, "require_passed", lambda folder: None)
    monkeypatch.setattr(train_mod, "train_student", lambda *a, **kw: seen.update(kw) or {})
    params = Params(effects={"cartoon": EffectConfig(prompt="a cartoon")})
    stage_student_checkpoint(params, "cartoon", EffectPaths(tmp_path, "cartoon"), False)
    assert seen["state_dir"] == tmp_path / ".cache" / "fxassets" / "train" / "cartoon"
    assert seen["root"] == tmp_path


# ------------------------------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory) -> Path:
    """A random-weight LPIPS network (non-negative linear heads, as trained ones are), never downloaded."""
    from torchmetrics.functional.image.lpips import _LPIPS

    torch.manual_seed(0)
    sd = _LPIPS(pretrained=False, net="alex", pnet_rand=True).state_dict()
    sd = {k: v.abs() if k.startswith(("lin", "lins")) else v for k, v in sd.items()}
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex.pth"
    torch.save(sd, path)
    return path


def test_lpips_is_zero_for_identical_images_and_positive_otherwise(lpips_file):
    lp = load_lpips(lpips_file)
    assert isinstance(lp, LPIPS) and not lp.train().training
    assert all(not p.requires_grad for p in lp.parameters())
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    assert float(lp(a, a)) == pytest.approx(0.0, abs=1e-7)
    pred = b.clone().requires_grad_(True)
    d = lp(pred, a)
    assert float(d.detach()) > 0
    d.backward()  # the student gets a gradient through it, the frozen network none
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0
    assert all(p.grad is None for p in lp.parameters())


def test_lpips_from_safetensors(lpips_file, tmp_path):
    from safetensors.torch import save_model

    from torchmetrics.functional.image.lpips import _LPIPS

    net = _LPIPS(pretrained=False, net="alex", pnet_rand=True)
    net.load_state_dict(torch.load(lpips_file, weights_only=True))
    path = tmp_path / "lpips.safetensors"
    save_model(net, str(path))  # keeps one name of each shared tensor
    a, b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    assert torch.equal(load_lpips(path)(a, b), load_lpips(lpips_file)(a, b))


def test_lpips_errors(lpips_file, tmp_path):
    with pytest.raises(ValueError, match=r"params\.yaml: train\.lpips_weight > 0 needs train\.lpips_weights: "):
        Objective(tiny_cfg(lpips_weight=0.5))
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*train\.lpips_weights"):
        Objective(tiny_cfg(lpips_weight=0.5, lpips_weights=missing))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match=rf"{wrong}: not the state_dict of torchmetrics' LPIPS"):
        load_lpips(wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"{garbage}: cannot read the LPIPS weights"):
        load_lpips(garbage)
    shape = tmp_path / "shape.pth"
    sd = torch.load(lpips_file, weights_only=True)
    sd["lin0.model.1.weight"] = torch.zeros(1, 7, 1, 1)
    torch.save(sd, shape)
    with pytest.raises(ValueError, match=str(shape)):
        load_lpips(shape)


def test_objective_adds_lpips_and_trains_with_it(lpips_file, pairs, tmp_path):
    torch.manual_seed(0)
    src, out, tgt = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    plain = Objective(tiny_cfg())
    assert torch.equal(plain(src, out, tgt), l1_ssim_loss(out, tgt, 1.0, 0.5))
    # a relative path is read from the project root
    (tmp_path / "models").mkdir()
    shutil.copy(lpips_file, tmp_path / "models" / "lpips.pth")
    cfg = tiny_cfg(lpips_weight=0.5, lpips_weights="models/lpips.pth", steps=2, eval_every=100)
    with_lpips = Objective(cfg, lpips_root=tmp_path)
    expected = l1_ssim_loss(out, tgt, 1.0, 0.5) + 0.5 * with_lpips.lpips(out, tgt)
    assert float(with_lpips(src, out, tgt)) == pytest.approx(float(expected), rel=1e-6)
    metrics = run(pairs, tmp_path / "out", cfg, tmp_path / "state", root=tmp_path)
    assert metrics["steps"] == 2


# ---------------------------------------------------------------------------------------------------- PatchGAN


def test_patch_discriminator_shape():
    d = PatchDiscriminator()
    assert d(torch.rand(2, 3, 128, 128), torch.rand(2, 3, 128, 128)).shape == (2, 1, 14, 14)


def test_objective_adds_the_adversarial_term():
    torch.manual_seed(0)
    cfg = tiny_cfg(gan_weight=0.25)
    obj = Objective(cfg)
    src, out, tgt = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64, requires_grad=True), torch.rand(2, 3, 64, 64)
    loss = obj(src, out, tgt)
    obj.adversary.eval()  # no power iteration: the same logits again
    expected = l1_ssim_loss(out, tgt, 1.0, 0.5) - 0.25 * obj.adversary(src, out).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()  # the generator term trains the student only
    assert out.grad is not None and all(p.grad is None for p in obj.adversary.parameters())


def test_gan_training_updates_the_discriminator(pairs):
    def train_fit(gan_weight: float):
        cfg = tiny_cfg(steps=3, eval_every=100, gan_weight=gan_weight)
        train, held = load_split(pairs, cfg)
        gen = seed_everything(cfg.seed)
        model = build_student(cfg.encoder, cfg.width)
        objective = Objective(cfg)
        before = {k: v.clone() for k, v in objective.state_dict().get("adversary", {}).items()}
        return fit(model, train, held, cfg, gen, objective=objective), objective, before

    with_gan, objective, before = train_fit(0.1)
    after = objective.adversary.state_dict()
    changed = [k for k in before if k.endswith("original") and not torch.equal(before[k], after[k])]
    assert len(changed) == 5  # every conv of the discriminator learnt
    without, _, _ = train_fit(0.0)
    assert with_gan.curve[-1]["train_loss"] != without.curve[-1]["train_loss"]


# ------------------------------------------------------------------------------------------------ curve plots


def test_dvc_plots_show_the_curves_beside_the_baseline(tmp_path):
    """dvc.yaml's plots are valid DVC 3 and draw held-out and identity PSNR / SSIM from curve.csv."""
    dvc = Path(sys.executable).parent / "dvc"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    effects = list(yaml.safe_load((REPO / "params.yaml").read_text())["effects"])
    for effect in effects:
        folder = tmp_path / "data" / "student" / effect
        folder.mkdir(parents=True)
        folder.joinpath("curve.csv").write_text(train_mod.curve_csv([
            {"step": s, "train_loss": 0.1, "heldout_psnr": 20.0 + s, "heldout_ssim": 0.8, "identity_psnr": 15.0,
             "identity_ssim": 0.6} for s in (2, 4)]))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(dvc), "init", "-q"], cwd=tmp_path, check=True, env=env)
    proc = subprocess.run([str(dvc), "plots", "show", "--json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=True)
    shown = json.loads(proc.stdout)
    assert "errors" not in shown, shown["errors"]
    for plot, fields in (("student_psnr", ("heldout_psnr", "identity_psnr")),
                         ("student_ssim", ("heldout_ssim", "identity_ssim"))):
        series = {row["filename::field"] for row in shown["data"][plot][0]["content"]["data"]["values"]}
        assert series == {f"{e}/curve.csv::{f}" for e in effects for f in fields}, series


def test_one_worker_checkpoint_records_the_train_config_as_before():
    """train.workers / ray_address / gpus_per_worker (DDP on Ray, train/distributed.py) stay out of the checkpoint's
    metadata while they are the defaults: a one-worker student keeps the bytes it had before they existed."""
    from fxassets.core.config import EXECUTION_KEYS

    assert not set(EXECUTION_KEYS) & set(TrainConfig().recipe())
    assert set(TrainConfig().recipe()) | set(EXECUTION_KEYS) == set(TrainConfig.model_fields)
    assert TrainConfig(workers=2).recipe()["workers"] == 2

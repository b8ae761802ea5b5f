"""The five stage functions, one per asset: params + effect -> files under data/<stage>/<effect>/ + a summary.

Both drivers call these: `dvc.yaml` through `fxassets stage NAME --effect E`, Dagster through DVC."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fxassets.core.config import Params
from fxassets.core.paths import STAGES, EffectPaths


def stage_prompts(p: Params, effect: str, paths: EffectPaths, progress: bool) -> dict[str, Any]:
    from fxassets.prompts import run_prompts

    return run_prompts(p.faces, p.effect(effect), paths.prompts_dir, paths.root)


def stage_teacher_images(p: Params, effect: str, paths: EffectPaths, progress: bool) -> dict[str, Any]:
    from fxassets.teachers.stage import run_teacher_images
    from fxassets.teachers import make_teacher

    teacher = make_teacher(p.teacher, p.effect(effect).teacher)
    return run_teacher_images(teacher, paths.prompts, paths.teacher_dir, paths.root, progress, faces=p.faces,
                              executor=p.teacher.executor, build=(p.teacher, p.effect(effect).teacher))


def stage_face_pairs(p: Params, effect: str, paths: EffectPaths, progress: bool) -> dict[str, Any]:
    from fxassets.pairs.stage import run_face_pairs
    from fxassets.pairs.gate import quality_for

    return run_face_pairs(p.faces, paths.teacher_dir, paths.pairs_dir, paths.root, progress, quality_for(p, effect))


def stage_student_checkpoint(p: Params, effect: str, paths: EffectPaths, progress: bool) -> dict[str, Any]:
    from fxassets.pairs.gate import require_passed
    from fxassets.core.paths import cache_root
    from fxassets.train.loop import train_student

    p.effect(effect)
    require_passed(paths.pairs_dir)  # GateError (a ValueError) with the gate's summary when the pair set failed
    # resume checkpoints live outside the DVC outs (DVC deletes those before running the stage)
    state_dir = cache_root(paths.root) / "train" / effect
    return train_student(paths.pairs_dir, p.train_for(effect), paths.checkpoint, paths.train_metrics, paths.train_curve, progress,
                         state_dir=state_dir, root=paths.root, margin=p.faces.margin)


def stage_mobile_model(p: Params, effect: str, paths: EffectPaths, progress: bool) -> dict[str, Any]:
    from fxassets.export.stage import export_mobile

    p.effect(effect)
    return export_mobile(
        paths.checkpoint, paths.pairs_dir, p.export_for(effect), paths.mobile_dir,
        paths.onnx_fp32, paths.onnx_int8, paths.grid, paths.mobile_report, progress,
        onnx_ort=paths.onnx_ort, targets_dir=paths.mobile_targets, model_card=paths.model_card,
        train_metrics=paths.train_metrics,
        teacher_json=paths.teacher_dir / "teacher.json", faces_source=paths.root / p.faces.source, effect=effect,
    )


# The figures `dvc exp show` lists, per stage: a compact `metrics/<stage>/<effect>.json` keyed by the effect, so that
# the columns read `cartoon.heldout_psnr` (README, "Experiments"); every figure stays in the stage's own
# metrics.json / report.json, which are not DVC metrics (their per-pair lists and nested tables would fill the table).
EXP_METRICS: dict[str, tuple[str, ...]] = {
    "student_checkpoint": ("heldout_psnr", "heldout_ssim", "identity_psnr", "steps", "capped"),
    "mobile_model": ("int8_psnr_db", "parity_psnr_db"),
}

STAGE_FUNCS: dict[str, Callable[[Params, str, EffectPaths, bool], dict[str, Any]]] = {
    "prompts": stage_prompts,
    "teacher_images": stage_teacher_images,
    "face_pairs": stage_face_pairs,
    "student_checkpoint": stage_student_checkpoint,
    "mobile_model": stage_mobile_model,
}
assert tuple(STAGE_FUNCS) == STAGES


def run_stage(name: str, params: Params, effect: str, root: Path = Path("."), progress: bool = True) -> dict[str, Any]:
    if name not in STAGE_FUNCS:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    from fxassets.core.atomic import write_json
    from fxassets.core.runlog import write_run_log

    params.effect(effect)  # fails early, naming the known effects
    paths = EffectPaths(Path(root), effect)
    summary = STAGE_FUNCS[name](params, effect, paths, progress)
    if name in EXP_METRICS:
        figures = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items() if k in EXP_METRICS[name]}
        write_json(paths.exp_metrics(name), {effect: figures})
    write_run_log(Path(root), name, effect, summary)  # the timings: outside the outputs (fxassets.core.runlog)
    return summary

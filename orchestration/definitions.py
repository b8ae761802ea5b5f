"""The Dagster code location: `dagster dev -m orchestration.definitions`, `dagster asset materialize -m ...`.

    sources.py      observable source assets: source_faces, and per effect teacher_config, quality_config, effect_config
    assets.py       prompts -> teacher_images -> face_pairs -> student_checkpoint -> mobile_model, per effect,
                    each one `dvc repro --single-item STAGE@EFFECT`
    checks.py       blocking pair checks on face_pairs, the int8 parity check on mobile_model
    resources.py    the DVC project (local or workspace mode), the quality gates, the executor
    sync.py         record a plain `dvc repro` in Dagster (CLI and the `dvc_sync` sensor)
    project.py      dvc.yaml + params.yaml -> edges, code versions, source versions (Dagster-free)

The project root is `$FXASSETS_ROOT` if set, else the folder holding this package. Partitions are the effects in
params.yaml, read when the definitions load: reload the code location after adding an effect or editing a param
that is part of a code version (faces.* other than source, train, export); the teacher and the effects'
own params are observed live.
"""

from pathlib import Path

from dagster import AssetSelection, Definitions, define_asset_job

from orchestration.assets import build_pipeline
from orchestration.project import Project
from orchestration.resources import make_executor, make_resources
from orchestration.sync import build_sync_sensor


def build_defs(root: str | Path | None = None) -> Definitions:
    project = Project.load(root)
    effects, sources, stages = build_pipeline(project)
    build_effect = define_asset_job(
        "build_effect", selection=AssetSelection.assets(*stages), partitions_def=effects,
        description="every stage of one effect, in order (each through DVC)",
    )
    return Definitions(
        assets=[*sources, *stages],
        jobs=[build_effect],
        sensors=[build_sync_sensor(project.root)],
        resources=make_resources(project.root),
        executor=make_executor(),
    )


# what `dagster dev -m orchestration.definitions` loads (built once, at import; nothing else in orchestration/
# imports this module, so `python -m orchestration.sync` never builds it)
defs = build_defs()

"""Dagster definitions over the DVC pipeline: `dagster dev -m orchestration.definitions` (or `make ui`).

The assets run the same `dvc.yaml` stages through DVC, so Dagster and `dvc status` agree on what is stale; see
`definitions.py` for the layout. Nothing here is imported by `fxassets` (the library stays free of Dagster and DVC).
"""

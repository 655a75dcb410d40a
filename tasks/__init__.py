"""Installed as ``spa_tasks``: the per-stage CLI (``spa``) and the Prefect tasks wrapping the stages."""

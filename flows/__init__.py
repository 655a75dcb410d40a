"""Installed as ``spa_flows``: the Prefect flows chaining the stages."""

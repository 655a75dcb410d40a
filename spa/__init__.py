"""spa-pipeline: Spread Preference Annotation (Kim et al., ICLR 2025) as Parquet stages.

The library: algorithm (`spa.training.losses`, `spa.judges.implicit_reward`), rendering and log-probs,
artifact schemas, config. No Prefect import here.
"""

__version__ = "0.1.0"

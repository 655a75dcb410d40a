"""Pairwise annotators for evaluation, and win rates through alpaca-eval's own code.

An annotator compares a reference output (``output_1``) with the model's (``output_2``)
for an instruction and gives alpaca-eval's preference: 1 (reference wins), 2 (model
wins), 1.5 (tie); weighted alpaca-eval annotators give any value in [1, 2]. Specs:

- ``python:module:function``: ``fn(instruction, output_1, output_2) -> 1 | 1.5 | 2`` (the demo
  world's oracle, or a user's own);
- ``alpaca_eval:<config>``: any alpaca-eval annotator config by name (e.g.
  ``weighted_alpaca_eval_gpt4_turbo``) or a path to a ``configs.yaml``. Its API key comes from
  the environment only. With an :class:`Endpoint`, the requests go to an OpenAI-compatible
  server (a local vLLM with an open judge model) through alpaca-eval's client config.

Secrets: an endpoint names the *environment variable* of its key; the key is read by the HTTP
client at request time and never passes through our logs, configs or artifacts.
"""

from __future__ import annotations

import importlib
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spa.errors import AnnotatorError, AnnotatorUnavailable

Annotator = Callable[[str, str, str], float]

# the environment variable each alpaca-eval decoder needs (alpaca_eval/decoders)
_KEY_ENV = {
    "openai_completions": "OPENAI_API_KEY",
    "anthropic_completions": "ANTHROPIC_API_KEY",
    "google_completions": "GOOGLE_API_KEY",
    "cohere_completions": "COHERE_API_KEY",
}




@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server for an alpaca-eval annotator config."""

    base_url: str
    model: str | None = None  # overrides the config's model_name
    api_key_env: str = "OPENAI_API_KEY"


def _import_openai_client():
    from openai import OpenAI

    return OpenAI


class EnvKeyOpenAI:
    """``openai.OpenAI`` whose key is read from the environment variable named in the client config.

    alpaca-eval builds clients from a YAML client config; naming a variable there (instead of
    writing the key) keeps the secret out of every file.
    """

    def __new__(cls, api_key_env: str = "OPENAI_API_KEY", **kwargs):
        key = os.environ.get(api_key_env)
        if not key:
            raise AnnotatorUnavailable(f"the judge endpoint needs its API key in ${api_key_env}")
        return _import_openai_client()(api_key=key, **kwargs)


def load_annotator(spec: str) -> Annotator:
    """Resolve ``python:module:function`` to the function."""
    kind, _, target = spec.partition(":")
    if kind != "python" or ":" not in target:
        raise AnnotatorError(f"annotator {spec!r}: expected 'python:module:function'")
    module, _, name = target.rpartition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise AnnotatorError(f"annotator {spec!r}: cannot import ({exc})") from exc
    if not callable(fn):
        raise AnnotatorError(f"annotator {spec!r} is not callable")
    return fn


def annotate(fn: Annotator, instructions: Sequence[str], reference: Sequence[str], outputs: Sequence[str]) -> list[float]:
    """Preferences of a Python annotator, one per instruction."""
    prefs = [float(fn(i, r, o)) for i, r, o in zip(instructions, reference, outputs, strict=True)]
    bad = [k for k, p in enumerate(prefs) if p not in (1.0, 1.5, 2.0)]
    if bad:
        raise AnnotatorError(f"annotator returned {prefs[bad[0]]} for row {bad[0]}; expected 1, 1.5 or 2")
    return prefs


def _alpaca_config(name: str) -> tuple[Path, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # alpaca-eval 0.6.6 imports pkg_resources
        from alpaca_eval import constants, utils
    path = Path(name)
    if not path.exists():
        path = Path(constants.EVALUATORS_CONFIG_DIR) / name
    if path.is_dir():
        path = path / "configs.yaml"
    if not path.exists():
        raise AnnotatorError(f"alpaca-eval annotator config {name!r} not found (a name under "
                             f"alpaca_eval/evaluators_configs, or a path to a configs.yaml)")
    return path, utils.load_configs(path)


def check_available(spec: str, endpoint: Endpoint | None = None) -> None:
    """Raise :class:`AnnotatorUnavailable` with the reason when ``spec`` cannot annotate here."""
    kind, _, target = spec.partition(":")
    if kind == "python":
        load_annotator(spec)
        return
    if kind != "alpaca_eval" or not target:
        raise AnnotatorError(f"annotator {spec!r}: expected 'python:module:function' or 'alpaca_eval:<config>'")
    _, configs = _alpaca_config(target)
    for conf in configs.values():
        decoder = conf.get("fn_completions", "openai_completions")
        env = endpoint.api_key_env if endpoint is not None else _KEY_ENV.get(decoder)
        if endpoint is not None and decoder != "openai_completions":
            raise AnnotatorError(f"judge_endpoint needs an openai_completions annotator; {target!r} uses {decoder}")
        if env and not os.environ.get(env):
            raise AnnotatorUnavailable(f"annotator {target!r} needs ${env} in the environment")


def annotate_alpaca_eval(config: str, instructions: Sequence[str], reference: Sequence[str], outputs: Sequence[str],
                         reference_generator: str, generator: str, endpoint: Endpoint | None = None,
                         seed: int = 0) -> list[float | None]:
    """Preferences from an alpaca-eval annotator config (``PairwiseAnnotator.annotate_head2head``).

    A row the annotator could not label (an API failure after alpaca-eval's retries) is ``None``.
    """
    import yaml

    check_available(f"alpaca_eval:{config}", endpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from alpaca_eval.annotators import PairwiseAnnotator
    path, _ = _alpaca_config(config)
    o1 = [{"instruction": i, "output": r, "generator": reference_generator} for i, r in zip(instructions, reference, strict=True)]
    o2 = [{"instruction": i, "output": o, "generator": generator} for i, o in zip(instructions, outputs, strict=True)]
    with tempfile.TemporaryDirectory(prefix="spa-judge-") as tmp:
        decoding: dict[str, Any] = {}
        if endpoint is not None:
            client_config = Path(tmp) / "client_config.yaml"
            client_config.write_text(yaml.safe_dump({"default": [{
                "client_class": "spa.evaluation.annotators.EnvKeyOpenAI", "api_key_env": endpoint.api_key_env,
                "base_url": endpoint.base_url}]}))
            decoding["client_config_path"] = str(client_config)
        annotator = PairwiseAnnotator(annotators_config=str(path), caching_path=None, seed=seed,
                                      is_avoid_reannotations=False)
        if endpoint is not None and endpoint.model:
            for single in annotator.annotators.values():
                single.completions_kwargs["model_name"] = endpoint.model
        rows = annotator.annotate_head2head(outputs_1=o1, outputs_2=o2, is_ordered=True, **decoding)
    if len(rows) != len(instructions):
        raise AnnotatorError(f"alpaca-eval returned {len(rows)} annotations for {len(instructions)} outputs")
    prefs: list[float | None] = []
    for row in rows:
        p = row.get("preference")
        prefs.append(None if p is None or (isinstance(p, float) and math.isnan(p)) else float(p))
    return prefs


def win_rate(preferences: Sequence[float]) -> dict[str, Any]:
    """alpaca-eval's ``get_winrate`` (percent), as plain Python numbers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # alpaca-eval 0.6.6 imports pkg_resources
        from alpaca_eval.metrics import get_winrate
    out = get_winrate({"preference": list(preferences)})
    return {k: (float(v) if hasattr(v, "__float__") else v) for k, v in out.items()}

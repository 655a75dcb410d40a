"""Model settings given as Hugging Face hub ids (``org/name`` or ``org/name@revision``), resolved once.

A model setting (``model.pi_init``, ``model.pi_0``, ``judge.reward_model``, ``judge.llm_judge_model``) may
be a local directory or a hub id. :func:`resolve_model_refs` turns each hub id into the snapshot directory
of one exact commit, through ``huggingface_hub.snapshot_download`` (the local cache when offline or when
``HF_HUB_OFFLINE=1``; a download when the hub is reachable), and records what it resolved
(``model.hub_refs``: repo id, revision asked for, commit). The resolved config saved in the run directory
then names that snapshot directory: every stage, ``spa plan`` and the sampler read the same files, the
resume keys hash them as they hash a local model, and a branch that moves later never changes a finished
run. Only weights in safetensors, configs and tokenizer files are fetched (no pickled weights, no code).

The resolution happens at the edge (the command line and the flows read a config file through
:func:`resolve_model_refs`); the library itself only ever sees directories.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from spa.errors import ConfigError, HubModelNotFound

# (section, key) of every setting that names a model
MODEL_SETTINGS = (("model", "pi_init"), ("model", "pi_0"), ("judge", "reward_model"), ("judge", "llm_judge_model"))
# what a stage reads from a model folder; never *.bin/*.pt (pickles) or *.py (remote code)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def parse_hub_id(value: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``value`` reads as a hub id and is no existing path, else None."""
    if not value or Path(value).exists() or value.startswith((".", "/", "~")):
        return None
    m = _HUB_ID.match(value)
    return (m.group("repo"), m.group("rev")) if m else None


def resolve_hub_id(repo_id: str, revision: str | None, key: str) -> tuple[Path, str]:
    """The snapshot directory and commit hash of ``repo_id`` at ``revision`` (default ``main``).

    Raises ``ConfigError`` (one line, naming the setting) when the model is neither in the local cache nor
    reachable on the hub, or holds no safetensors weights."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                      local_files_only=bool(constants.HF_HUB_OFFLINE)))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        where = "the local cache" + ("" if constants.HF_HUB_OFFLINE else " or the hub")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubModelNotFound(f"{key}: {repo_id}@{revision or 'main'} is not in {where} ({first[:160]}); "
                          "download it on a machine that reaches the hub, or give a local directory") from exc
    if not any(path.glob("*.safetensors")) and not (path / "adapter_config.json").exists():
        raise ConfigError(f"{key}: {repo_id}@{revision or 'main'} has no *.safetensors weights; this pipeline "
                          "loads safetensors only (convert the weights, or give a local directory)")
    return path, path.name


def resolve_model_refs(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw config mapping with every hub-id model setting replaced by its snapshot directory,
    and ``model.hub_refs`` recording ``{setting: {repo_id, revision, commit}}``. Local paths stay as they are.

    ``org/name`` without a revision could also be a relative folder that does not exist yet (``models/sft``
    before it is downloaded): when the cache and the hub do not know it, it stays as it is and the preflight
    check reports a missing folder. With ``@revision`` it is a hub id, and not finding it is a ``ConfigError``.
    An already resolved config (a run directory's ``config.yaml``) names snapshot directories, so resolving it
    again is a no-op."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    refs: dict[str, dict[str, str | None]] = dict((out.get("model") or {}).get("hub_refs") or {})
    for section, key in MODEL_SETTINGS:
        node = out.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        parsed = parse_hub_id(value) if isinstance(value, str) else None
        if parsed is None:
            continue
        repo_id, revision = parsed
        try:
            path, commit = resolve_hub_id(repo_id, revision, f"{section}.{key}")
        except HubModelNotFound:
            if revision is not None:  # `@revision` says it is a hub id: not finding it is the error
                raise
            continue  # `models/sft` may be a folder not written yet: the preflight check names it if it is missing
        node[key] = str(path)
        refs[f"{section}.{key}"] = {"repo_id": repo_id, "revision": revision or "main", "commit": commit}
    if refs:
        out.setdefault("model", {})
        out["model"] = dict(out["model"]) | {"hub_refs": refs}
    return out

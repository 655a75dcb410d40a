"""``spa push ITER --repo-id ORG/NAME``: upload a finished model of a run, with its card, to the Hugging Face Hub.

A model is finished when the manifest records its stage (``seed`` for ``t = 0``, ``train/<t>``) with the
model directory among the outputs and the directory still has the recorded content hash; it must hold its
card (``README.md``, :mod:`spa.run.model_card`). Hidden files (the hash cache ``.spa_hashes.json``) stay
home. The token comes only from the environment (``HF_TOKEN``) or huggingface_hub's own login, and is
never printed. Every refusal is a :class:`spa.errors.PushError` (one line, exit code 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from spa.config import SPAConfig
from spa.errors import PushError
from spa.run.layout import RunLayout
from spa.run.manifest import Manifest, Stage, content_hash
from spa.run.model_card import CARD

# the Hub's repo ids: org/name, letters, digits, '-', '_', '.', no '--' or '..', at most 96 characters
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
IGNORED = [".*", "*/.*"]  # upload_folder's patterns for what ``files`` leaves out


@dataclass(frozen=True)
class PushPlan:
    repo_id: str
    folder: Path
    files: list[tuple[str, int]]  # (path relative to the folder, size in bytes), sorted

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def check_repo_id(repo_id: str) -> str:
    if len(repo_id) > 96 or not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id \
            or repo_id.endswith(".git"):
        raise PushError(f"--repo-id {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.'; at most 96 "
                        "characters, no '--' or '..')")
    return repo_id


def files(folder: Path) -> list[tuple[str, int]]:
    """The files that go up: everything under ``folder`` but hidden files and folders."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((rel.as_posix(), path.stat().st_size))
    return out


def finished_model(cfg: SPAConfig, t: int) -> Path:
    """``iter_t/model`` when its stage is recorded as done and the directory is unchanged since; else PushError."""
    layout = RunLayout.of(cfg)
    model = layout.model(t)
    stage = Stage.TRAIN.key(t)
    hint = "spa seed" if t == 0 else f"spa train --iteration {t}"
    if not layout.iteration(t).is_dir():
        raise PushError(f"{layout.iteration(t)}: iteration {t} does not exist in this run; run `{hint}` first")
    if not model.is_dir():
        raise PushError(f"{model}: iteration {t} has no model; run `{hint}` first")
    try:
        entry = Manifest(layout.manifest).get(stage)
    except ValueError as exc:  # a corrupt manifest
        raise PushError(str(exc)) from None
    recorded = (entry or {}).get("outputs", {}).get(f"iter_{t}/model")
    if recorded is None:
        raise PushError(f"{model}: the {stage} stage is not recorded as finished in {layout.manifest}; "
                        f"run `{hint}` to finish it")
    if content_hash(model) != recorded:
        raise PushError(f"{model}: changed since the {stage} stage wrote it (content hash differs from the "
                        f"manifest's); rerun `{hint} --force` or restore it")
    if not (model / CARD).is_file():
        raise PushError(f"{model / CARD}: the model card is missing; `spa evaluate --iteration {t}` writes it")
    return model


def plan_push(cfg: SPAConfig, t: int, repo_id: str) -> PushPlan:
    """What ``spa push`` would upload: checks the repo id and the model, touches no network."""
    check_repo_id(repo_id)
    model = finished_model(cfg, t)
    return PushPlan(repo_id, model, files(model))


def upload(plan: PushPlan, private: bool = False, revision: str | None = None) -> str:
    """Create the repo (if needed), and the branch ``revision``, then upload the folder; returns the commit URL."""
    import huggingface_hub
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE is set: unset it to upload (or use --dry-run)")
    if huggingface_hub.get_token() is None:
        raise PushError("no Hugging Face token: set HF_TOKEN in the environment or run `hf auth login`")
    api = HfApi()
    try:
        api.create_repo(plan.repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(plan.repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=plan.repo_id, folder_path=str(plan.folder), repo_type="model",
                                 revision=revision, ignore_patterns=IGNORED,
                                 commit_message=f"spa push: {plan.folder.parent.name} of {plan.folder.parents[1].name}")
    except HfHubHTTPError as exc:  # refused by the hub (no rights, bad token, a name taken): no retry helps
        status = getattr(exc.response, "status_code", None)
        raise PushError(f"the hub refused the upload to {plan.repo_id} (HTTP {status}): "
                        f"{str(exc).strip().splitlines()[0][:200]}") from None
    return str(getattr(info, "commit_url", info))


def describe(plan: PushPlan) -> list[str]:
    """The dry run's lines: each file with its size, then the total."""
    lines = [f"{size:>14,d}  {name}" for name, size in plan.files]
    return lines + [f"{plan.total_bytes:>14,d}  bytes in {len(plan.files)} files from {plan.folder} -> "
                    f"{plan.repo_id} (dry run: nothing uploaded)"]

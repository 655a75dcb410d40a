"""Sampling in another Python environment (``sample.python``, e.g. the vLLM environment) from this one.

vLLM pins its own transformers and cannot share the pipeline's environment on a CPU machine
(``install.sh --vllm`` gives it ``.venv-vllm``). The sample stage runs there as a whole; the stages
that answer prompts in passing (evaluation, the gold pairs of ``spa gold-pairs``) call
:class:`RemoteSampler`, which has the samplers' interface and runs each call in that interpreter:
prompts and the sampling spec go in as files of a temporary folder, the samples come back as Parquet.

    python -m spa.models.remote_sampling WORKDIR     # the worker (reads WORKDIR/job.json)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from spa.models.sampling import Samples, SamplingSpec, make_sampler
from spa.run.console import run_relayed


def same_interpreter(python: str | None) -> bool:
    """Whether ``python`` is this process's interpreter (venv interpreters are symlinks: compare unresolved)."""
    return not python or os.path.abspath(python) == os.path.abspath(sys.executable)


class RemoteSampler:
    """A sampler whose every call runs ``make_sampler(backend, model_dir, spec)`` in ``python``."""

    def __init__(self, python: str, backend: str, model_dir: str | Path, spec: SamplingSpec):
        self.python, self.backend, self.model_dir, self.spec = python, backend, str(model_dir), spec

    def __call__(self, prompts: Sequence, progress: str | None = None, max_new_tokens: int | None = None) -> list[Samples]:
        import pyarrow.parquet as pq

        spec = self.spec if max_new_tokens is None else dataclasses.replace(self.spec, max_new_tokens=max_new_tokens)
        with tempfile.TemporaryDirectory(prefix="spa-sample-") as tmp:
            job = {"backend": self.backend, "model_dir": self.model_dir, "spec": dataclasses.asdict(spec),
                   "prompts": list(prompts), "progress": progress}
            (Path(tmp) / "job.json").write_text(json.dumps(job))
            run_relayed([self.python, "-m", "spa.models.remote_sampling", tmp])  # its logs: ours to route
            rows = pq.read_table(Path(tmp) / "samples.parquet").to_pylist()
        return [Samples(**row) for row in rows]


def sampler_for(python: str | None, backend: str, model_dir: str | Path, spec: SamplingSpec):
    """A sampler in this process, or in ``python`` when that is another interpreter."""
    if same_interpreter(python):
        return make_sampler(backend, model_dir, spec)
    return RemoteSampler(python, backend, model_dir, spec)  # type: ignore[arg-type]


def _work(workdir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    job = json.loads((workdir / "job.json").read_text())
    sampler = make_sampler(job["backend"], job["model_dir"], SamplingSpec(**job["spec"]))
    samples = sampler(job["prompts"], progress=job["progress"])
    pq.write_table(pa.Table.from_pylist([dataclasses.asdict(s) for s in samples]), workdir / "samples.parquet")


if __name__ == "__main__":
    _work(Path(sys.argv[1]))

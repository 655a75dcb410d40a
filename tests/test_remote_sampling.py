"""Sampling in another interpreter (``sample.python``): the same samples as in this process, and the helper's
output routed through this process's streams (into a terminal session's log), never printed past it."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from spa.models.remote_sampling import RemoteSampler
from spa.models.sampling import SamplingSpec, make_sampler
from spa.run import console


def _spec() -> SamplingSpec:
    return SamplingSpec(n=2, temperature=0.7, top_p=1.0, max_new_tokens=6, seed=3, batch_size=4, max_length=64,
                        gpu_memory_utilization=0.2, max_num_batched_tokens=None, dtype="float32",
                        trust_remote_code=False)


def test_remote_sampler_gives_this_interpreters_samples_and_routes_its_output(tiny_model_dir, capfd):
    prompts = ["hello there", "tell me a story"]
    here = make_sampler("transformers", tiny_model_dir, _spec())(prompts)
    capfd.readouterr()  # this process's own loading bars
    sink = io.StringIO()
    stderr, sys.stderr = sys.stderr, sink
    try:
        remote = RemoteSampler(sys.executable, "transformers", tiny_model_dir, _spec())(prompts)
    finally:
        sys.stderr = stderr
    assert [s.responses for s in remote] == [s.responses for s in here] and remote[0].token_ids == here[0].token_ids
    assert capfd.readouterr().err == ""  # nothing went to the real file descriptors past sys.stderr


def test_run_relayed_writes_through_sys_stderr_and_raises_with_the_tail():
    sink = io.StringIO()
    stderr, sys.stderr = sys.stderr, sink
    try:
        console.run_relayed([sys.executable, "-c", "import sys; print('out line'); print('bar 1\\rbar 2', file=sys.stderr)"])
        with pytest.raises(subprocess.CalledProcessError) as failed:
            console.run_relayed([sys.executable, "-c", "print('last words'); raise SystemExit(3)"])
    finally:
        sys.stderr = stderr
    assert "out line\n" in sink.getvalue() and "bar 1\rbar 2\n" in sink.getvalue()
    assert failed.value.returncode == 3 and "last words" in failed.value.output


def test_a_terminal_session_keeps_the_helpers_output_in_the_log(tmp_path, capfd):
    with console.terminal_session(tmp_path / "run") as log_path:
        console.run_relayed([sys.executable, "-c", "print('INFO vllm chatter'); print('[sample/1] done in 1s: x=1')"])
    err = capfd.readouterr()
    terminal = err.out + err.err
    assert "vllm chatter" not in terminal and "[sample/1] done in 1s" in terminal
    assert "INFO vllm chatter" in Path(log_path).read_text()

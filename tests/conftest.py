"""Shared fixtures. No test may reach a model hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread per process (inherited by every stage subprocess): the tests run stage processes beside
# a Prefect server and pytest itself on 2 cores, and OpenMP threads spin-waiting for a busy core made one
# seed stage of the tiny model 8x slower under that load (18.9 s with 2 threads, 2.3 s with 1; 2026-12-01).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Prefect: a private home (SQLite API database) per test session, no telemetry, no outside server
import tempfile  # noqa: E402

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="spa-prefect-home-")
os.environ["SPA_CACHE_DIR"] = tempfile.mkdtemp(prefix="spa-hash-cache-")  # directory hashes: not the user's cache
os.environ.pop("PREFECT_API_URL", None)
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# the temporary server of an in-process flow may take longer than Prefect's 20 s to start on 2 busy cores
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _stop_prefects_temporary_server():
    """Stop the temporary Prefect server an in-process flow started while pytest's streams are still open.

    Prefect stops it from an ``atexit`` hook, which logs "Stopping temporary server" to a console pytest has
    closed by then: a "--- Logging error ---" traceback at the end of every worker's output."""
    yield
    server = sys.modules.get("prefect.server.api.server")
    if server is not None:  # only where a test imported it: nothing to stop otherwise
        for instance in list(server.SubprocessASGIServer._instances.values()):
            instance.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a local tokenizer and ChatML template, built once per session."""
    from spa.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


WORDS = "apple banana cherry grape lemon mango orange pear plum red green blue".split()


def write_preferences(path, n=60, seed=0):
    """A small plain-layout preference file (prompt/chosen/rejected strings)."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            a, b = rng.sample(WORDS, 2)
            fh.write(json.dumps({"prompt": f"Write about {a} and {b}, number {i}.",
                                 "chosen": f"{a} and {b} are nice.", "rejected": f"no {b}"}) + "\n")
    return path


@pytest.fixture(scope="session")
def prefs_file(tmp_path_factory):
    return write_preferences(tmp_path_factory.mktemp("data") / "prefs.jsonl")


def tiny_config(run_dir, pi_init, source, **sections):
    """A config for a seconds-long run on the tiny model; ``sections`` update the defaults."""
    from spa.config import parse_config

    raw = {
        "run_dir": str(run_dir),
        "iterations": 1,
        "model": {"pi_init": str(pi_init), "max_length": 256},
        "data": {"source": str(source), "seed_size": 16, "prompt_sizes": [16], "heldout_size": 8},
        "sample": {"max_new_tokens": 12, "batch_size": 8},
        "judge": {"batch_size": 8},
        "train": {"batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3, "seed_epochs": 1, "save_steps": 2},
        "evaluate": {"eval_set": "heldout", "max_prompts": 4, "max_new_tokens": 8},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return parse_config(raw)


# --- the pipeline flow, run once per session and shared by the flow tests ---
import json  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402


def flow_config(root: Path, tiny_model_dir, prefs_file, name="run", **over):
    cfg = tiny_config(root / name, tiny_model_dir, prefs_file, iterations=2,
                      data={"prompt_sizes": [12, 12]}, sample={"chunk_rows": 4}, judge={"chunk_rows": 4},
                      train={"save_steps": 1}, **over)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return cfg, path


def _output_hashes(run: Path) -> dict[str, str]:
    """Every stage's outputs by path relative to the run directory (comparable across runs)."""
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    out = {}
    for key, entry in stages.items():
        for path, digest in entry["outputs"].items():
            assert not Path(path).is_absolute(), path  # recorded relative to the run directory
            out[f"{key}:{path}"] = digest
    return out


def _finished_flow(root: Path, tiny_model_dir, prefs_file, **over):
    cfg, path = flow_config(root, tiny_model_dir, prefs_file, **over)
    res = subprocess.run([str(Path(sys.executable).parent / "spa"), "run", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return cfg, path, res


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, tiny_model_dir, prefs_file):
    """A finished 2-iteration ``spa run``, one process per stage (as on a GPU machine)."""
    return _finished_flow(tmp_path_factory.mktemp("flow"), tiny_model_dir, prefs_file)


@pytest.fixture(scope="session")
def inline_run(tmp_path_factory, tiny_model_dir, prefs_file):
    """The same run with every stage in the flow's process: the same artifacts and manifest (tests/test_flows.py,
    test_inline_stages_write_the_same_artifacts), a fifth of the time. Built once for the whole session, whichever
    xdist worker asks first (``_once_per_session``): read it, or copy it before changing anything."""
    return _once_per_session(tmp_path_factory, "flow-inline", lambda root: _finished_flow(
        root, tiny_model_dir, prefs_file, stage_processes="inline"))


def _once_per_session(tmp_path_factory, name, build):
    """``build(root) -> (cfg, path, CompletedProcess)`` run once per test session even across xdist workers
    (pytest-xdist's recipe: a directory beside every worker's base directory, built under a file lock; the workers'
    tiny models and preference files are built from the same seeds, so any worker's run serves them all)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    from spa.config import load_config

    root = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    done = root / "finished.json"
    with FileLock(f"{root}.lock"):
        if not done.exists():
            root.mkdir(exist_ok=True)
            _, path, res = build(root)
            done.write_text(json.dumps({"path": str(path), "args": res.args, "stdout": res.stdout,
                                        "stderr": res.stderr}))
    saved = json.loads(done.read_text())
    res = subprocess.CompletedProcess(saved["args"], 0, saved["stdout"], saved["stderr"])
    return load_config(Path(saved["path"])), Path(saved["path"]), res


ZEPHYR_ASSET = Path(__file__).parent / "assets" / "zephyr_tokenizer"


@pytest.fixture(scope="session")
def zephyr_tok(tmp_path_factory):
    """Zephyr's tokenizer (Mistral-7B v0.1's SentencePiece model from ``mistral-common``, stored as a gzipped fast
    ``tokenizer.json`` with zephyr-7b-sft-full's chat template): the paper's own model family."""
    import gzip
    import shutil

    from spa.models.rendering import load_tokenizer

    d = tmp_path_factory.mktemp("zephyr_tokenizer")
    with gzip.open(ZEPHYR_ASSET / "tokenizer.json.gz", "rb") as src, open(d / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ZEPHYR_ASSET / name, d / name)
    return load_tokenizer(d)




def kill_after_first_checkpoint(cmd: list[str], checkpoints: Path, timeout: float = 120) -> list[Path]:
    """Start a training command, SIGKILL its process group once its first checkpoint is complete, and return the
    checkpoints it left (the interrupted half of the kill-and-resume tests)."""
    import os
    import signal
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and not list(checkpoints.glob("checkpoint-*/spa_state.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = list(checkpoints.glob("checkpoint-*"))
    assert ckpts, "no checkpoint was written before the kill"
    return ckpts


def copy_without_chat_template(src, dst):
    """A copy of a model directory whose tokenizer has no chat template."""
    import shutil

    shutil.copytree(src, dst)
    (Path(dst) / "chat_template.jinja").unlink()
    cfg_path = Path(dst) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    return dst


def dense_logp_of_ids(model, prompt_ids, response_ids):
    """Summed log-probs of ``response_ids`` after ``prompt_ids``: one plain forward, no batching (tests' oracle)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt_ids) + list(response_ids)])).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(response_ids))


def bench_module(name: str):
    """A benchmark script of ``bench/`` imported as a module (they are scripts, not an installed package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def oracle_prefers_shorter(prompt, output_1, output_2):
    """A test oracle (alpaca-eval encoding): the shorter text wins, equal lengths tie."""
    return 1.0 if len(output_1) < len(output_2) else 2.0 if len(output_2) < len(output_1) else 1.5


# Longest files first (by their measured time, shared fixtures included). xdist's --dist loadfile hands out one
# file at a time to whichever worker runs low, so the longest should go first: a long file handed out last runs
# alone at the end (the vLLM engine test, ~3 min, did). xdist reorders files by their number of tests unless told
# not to (pytest_configure below): that order put the few-test, long files last.
FIRST_FILES = ("test_flows.py", "test_stages.py", "test_fsdp.py", "test_terminal.py", "test_vllm.py",
               "test_prefect_server.py", "test_training.py", "test_sspo_training.py", "test_demo_command.py", "test_variants_pipeline.py",
               "test_prefect_artifacts.py", "test_scaleout.py", "test_bad_inputs.py", "test_plan.py",
               "test_data_scripts.py", "test_bench_p7.py", "test_hub_models.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep FIRST_FILES' order
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(FIRST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST_FILES)))  # stable: each file stays contiguous


import socket  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

BIN = Path(sys.executable).parent


def _free_port_here() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def prefect_server(tmp_path):
    """A real ``prefect server start`` on 127.0.0.1 in a session of its own (a user's server); yields the
    environment that points at it."""
    port = _free_port_here()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("Prefect server did not start:\n" + (tmp_path / "server.log").read_text()[-2000:])
    yield {**env, "PREFECT_API_URL": url}
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)

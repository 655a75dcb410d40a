"""What the terminal shows (issue #16: "the terminal tells the story"): a line when a stage starts and one when
it ends, a closing table and the report's path; library chatter and the full log go to <run_dir>/logs/spa.log."""

import io
import logging
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import yaml
from conftest import flow_config

from spa.config import load_config

SPA = str(Path(sys.executable).parent / "spa")
STAGES = ["prepare", "seed", "evaluate/0", "sample/1", "judge/1", "train/1", "evaluate/1",
          "sample/2", "judge/2", "train/2", "evaluate/2"]
# what a 2-iteration run printed before: bars, trainer dicts, Prefect's and httpx's logs, liblinear's warning
CHATTER = ["Loading weights", "Writing model shards", "rewards/margins", "it/s]", "batch/s", "HTTP Request",
           "Task run", "Flow run", "temporary server", "specified in weight is not found", "\x1b[", "\r"]


def test_spa_run_tells_the_story_in_a_few_lines_and_logs_the_rest(tmp_path, inline_run):
    cfg, path, res = inline_run  # `spa run run.yaml` of a 2-iteration config, output captured: not a TTY, no bars
    text = res.stdout + res.stderr
    lines = [line for line in text.splitlines() if line.strip()]
    starts = [line for line in lines if line.startswith("$ spa ")]  # the stage commands the flow runs
    assert [line.split()[2] for line in starts] == [key.split("/")[0] for key in STAGES] + ["report"]
    # the flow hands every stage the run's resolved config (hub ids resolved once)
    assert starts[3] == f"$ spa sample -c {Path(cfg.run_dir) / 'config.yaml'} -t 1 (in the flow's process)"
    for key in STAGES:
        assert any(line.startswith(f"[{key}] done in ") for line in lines), key
    assert "[train/1] done in" in text and "final_loss=" in text and "gold_agreement=" in text
    assert "spa-pipeline: Finished in state Completed()" in lines
    # per stage its command and its done-line, the flow's end, the table (header, rule, a row per iteration), paths
    assert len(lines) <= 2 * (len(STAGES) + 1) + 1 + 2 + (cfg.iterations + 1) + 1, text
    header = next(i for i, line in enumerate(lines) if line.startswith("iteration"))
    assert ["win rate", "LC win rate", "gold agreement", "self-label acc.", "time"] == \
        [c for c in re.split(r"\s{2,}", lines[header]) if c][1:]
    assert [line.split()[0] for line in lines[header + 2: header + 5]] == ["0", "1", "2"]
    log_path = Path(cfg.run_dir) / "logs" / "spa.log"
    assert lines[-1].startswith(f"report: {Path(cfg.run_dir) / 'report.md'}") and str(log_path) in lines[-1]
    for pattern in CHATTER:
        assert pattern not in text, pattern
    log = log_path.read_text()
    assert "Finished in state Completed" in log and "temporary server" in log  # Prefect's log
    assert re.search(r"step 3: \{.*'loss'", log) and "'learning_rate'" in log  # the trainer's log dicts
    assert 'stage train/2 summary: {"steps": 3' in log  # the full summary behind the done-line

    # what follows changes the run: on a copy (the shared run stays as it finished)
    raw = yaml.safe_load(path.read_text())
    raw["run_dir"] = str(tmp_path / "run")
    shutil.copytree(cfg.run_dir, raw["run_dir"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    again = subprocess.run([SPA, "run", str(path), "--verbose"], capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[train/2] up to date" in again.stdout and "Finished in state Completed" in again.stdout + again.stderr

    # `spa expand` tells its story the same way: the batch it takes, the stages of the new iteration, the table
    import pyarrow as pa
    import pyarrow.parquet as pq

    (Path(cfg.run_dir) / "incoming").mkdir()
    fresh = ["Name three colours of fruit.", "Write about plums in winter.", "Is a lemon yellow?"]
    pq.write_table(pa.table({"prompt": fresh}), Path(cfg.run_dir) / "incoming" / "batch-001.parquet")
    grown = subprocess.run([SPA, "expand", str(path)], capture_output=True, text=True)
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    text = grown.stdout + grown.stderr
    lines = [line for line in text.splitlines() if line.strip()]
    assert any(line.startswith("[expand] batch-001") and "3 new prompts" in line and line.endswith("-> iteration 3")
               for line in lines), text
    assert [line.split()[2] for line in lines if line.startswith("$ spa ")] == \
        ["sample", "judge", "train", "evaluate", "report"]
    header = next(i for i, line in enumerate(lines) if line.startswith("iteration"))
    assert [line.split()[0] for line in lines[header + 2: header + 6]] == ["0", "1", "2", "3"]
    assert len(lines) <= 1 + 2 * 5 + 1 + 2 + 4 + 1, text
    for pattern in CHATTER:
        assert pattern not in text, pattern


def test_story_stream_shows_stage_lines_and_logs_everything(tmp_path):
    from spa.run import console

    terminal = io.StringIO()
    with console.terminal_session(tmp_path, verbose=False) as log_path:
        session = sys.stdout.session  # the StoryStream's session
        stream = console.StoryStream(session, terminal)
        stream.write("[sample/1] done in 2s: ok\nLoading weights:  50%|#  | 1/2\rLoading weights: 100%|##| 2/2\n")
        stream.write("{'rewards/margins': 0.1}\n[transformers] a warning\nerror: bad input\n[judge/1] done in 1s: ok")
        stream.close_buffer()
        logging.getLogger("httpx").warning("HTTP Request: POST http://127.0.0.1/api")
        assert console.progress_bar(10, "x", "step").disable  # no TTY here: no bar
    assert terminal.getvalue().splitlines() == ["[sample/1] done in 2s: ok", "error: bad input", "[judge/1] done in 1s: ok"]
    log = log_path.read_text()
    assert "Loading weights: 100%|##| 2/2" in log and "50%" not in log  # a bar's last state only
    assert "rewards/margins" in log and "[transformers] a warning" in log and "HTTP Request" in log
    assert not any(isinstance(h, console.StoryHandler) for h in logging.getLogger().handlers)  # restored


def test_length_control_fit_keeps_liblinears_warning_off_the_terminal(capfd, caplog):
    """The 153 'class label 0 specified in weight is not found' lines of a run came from liblinear (C stderr)
    inside alpaca-eval's cross-validated GLM fit when the model wins every item of a fold."""
    import pandas as pd
    from alpaca_eval.metrics.glm_winrate import fit_LogisticRegressionCV

    from spa.evaluation.length_control import lc_win_rate

    n = 20
    data = pd.DataFrame({"preference": [1.0] * n, "x": [float(i % 3) for i in range(n)]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's deprecation notes about alpaca-eval's arguments
        fit_LogisticRegressionCV(data, "preference", is_ytrue_proba=True, n_splits=5)
    assert "specified in weight is not found" in capfd.readouterr().err  # the source, unfiltered

    with caplog.at_level(logging.INFO, logger="spa.evaluation.length_control"):
        out = lc_win_rate([f"q{i}" for i in range(n)], ["short"] * n, ["a longer answer"] * n, [2.0] * n,
                          annotator="a", generator="m", reference_generator="r", alpaca_eval_set=False)
    assert out["lc_win_rate"] is not None
    assert "specified in weight is not found" not in capfd.readouterr().err
    assert any("liblinear" in r.getMessage() for r in caplog.records)


def test_a_stage_run_by_hand_prints_its_own_lines_and_logs_the_rest(tmp_path, tiny_model_dir, prefs_file):
    """`spa prepare` and `spa seed` typed by a user: their done-lines on the terminal, the trainer's dicts and the
    weight-loading output in the run's log (as under `spa run`); `-v` shows them on the terminal too."""
    cfg, path = flow_config(tmp_path, tiny_model_dir, prefs_file)
    texts = {}
    for stage in ("prepare", "seed"):
        res = subprocess.run([SPA, stage, "-c", str(path)], capture_output=True, text=True)  # not a TTY: no bars
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        texts[stage] = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(texts["prepare"]) == 1 and texts["prepare"][0].startswith("[prepare] done in "), texts["prepare"]
    assert len(texts["seed"]) == 1 and texts["seed"][0].startswith("[seed] done in "), texts["seed"]
    log = (Path(cfg.run_dir) / "logs" / "spa.log").read_text()
    assert "'learning_rate'" in log and "[seed] done in " in log  # the trainer's log dicts and the story, logged

    loud = subprocess.run([SPA, "seed", "-c", str(path), "--force", "-v"], capture_output=True, text=True)
    assert loud.returncode == 0, loud.stdout[-3000:] + loud.stderr[-3000:]
    assert "'learning_rate'" in loud.stdout + loud.stderr  # verbose: the library output on the terminal too

    bad = subprocess.run([SPA, "train", "-c", str(path), "-t", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and (bad.stdout + bad.stderr).strip().startswith("error: "), bad.stdout + bad.stderr
    assert len((bad.stdout + bad.stderr).strip().splitlines()) == 1


def test_a_stage_process_relays_its_bar_and_the_flow_draws_it(monkeypatch):
    """Under `spa run` a stage process writes into a pipe, not a terminal, so it cannot draw its bar: it sends the
    bar's state as marked lines, and the flow draws one bar from them on its terminal (only there) and keeps them
    out of the log."""
    from spa.run import console

    child = ("from spa.run.console import progress_bar\n"
             "bar = progress_bar(5, 'sample iter 1', 'prompt')\n"
             "for _ in range(5):\n    bar.update(1)\n"
             "bar.set_postfix({'loss': 0.5}, refresh=False)\nbar.close()\nprint('[sample/1] done in 0.1s: prompts=5')\n")
    env = {**__import__("os").environ, console.PROGRESS_RELAY_ENV: "1"}
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "[sample/1] done in 0.1s: prompts=5" and all(x.startswith(console.RELAY_MARK) for x in lines[:-1])

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    relayed = console.RelayedBar()
    kept = [line for line in lines if not relayed.feed(line)]
    assert kept == ["[sample/1] done in 0.1s: prompts=5"]  # what the flow logs: the stage's own line only
    assert relayed.n == 5 and relayed.bar is None  # the bar reached the total and was closed with the stage's
    assert "sample iter 1" in terminal.getvalue()  # drawn on the (pretend) terminal

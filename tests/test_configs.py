"""The shipped presets in configs/: each loads, the paper preset carries the paper's values, the demo presets
equal what the code builds, each header says how to launch it, and prefect.yaml points at real files."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spa.config import load_config, parse_config
from spa.demo.run import demo_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DEMO_WORLD, DEMO_RUN = Path("runs/demo/world"), Path("runs/demo/run")  # `spa demo`'s defaults (--out runs/demo)
LAUNCH = re.compile(r"^#\s+(?:\.venv/bin/)?spa (run|plan|check-config|prepare)\b.*?(configs/[\w.-]+\.yaml)", re.M)


def header(path: Path) -> str:
    """The comment block the file starts with."""
    lines = path.read_text(encoding="utf-8").splitlines()
    block = []
    for line in lines:
        if not line.startswith("#"):
            break
        block.append(line)
    return "\n".join(block)


def test_there_are_presets():
    assert len(CONFIGS) >= 4
    assert {p.name for p in CONFIGS} >= {"paper_zephyr_4gpu.yaml", "single_gpu_lora.yaml", "demo.yaml", "smollm2.yaml",
                                         "llama70b_8gpu_lora.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_preset_loads(path):
    cfg = load_config(path)
    assert cfg.run_dir.startswith("runs/")  # everything a preset writes goes under the git-ignored runs/


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_header_names_its_launch_command(path):
    text = header(path)
    assert text, f"{path.name}: no header comment"
    named = [f for _, f in LAUNCH.findall(text)]
    assert f"configs/{path.name}" in named, f"{path.name}: no `spa run|plan ... configs/{path.name}` in the header"
    assert all((ROOT / f).is_file() for f in named), named


def test_paper_preset_has_the_paper_values():
    cfg = load_config(ROOT / "configs" / "paper_zephyr_4gpu.yaml")
    assert cfg.model.pi_init.endswith("zephyr-7b-sft-full")
    assert "alignment-handbook/zephyr-7b-sft-full" in header(ROOT / "configs" / "paper_zephyr_4gpu.yaml")
    assert cfg.iterations == 3
    assert "ultrafeedback" in cfg.data.source
    assert (cfg.data.seed_size, cfg.data.prompt_sizes) == (2000, [8000, 20000, 30000])
    t = cfg.train
    assert (t.beta, t.learning_rate, t.batch_size) == (0.1, 5e-7, 32)
    assert isinstance(t.learning_rate, float)
    assert (t.lr_scheduler, t.warmup_ratio, t.seed_epochs, t.epochs) == ("cosine", 0.1, 3, 1)
    assert (t.loss, t.lora) == ("dpo", None)  # full fine-tuning with the refined DPO loss
    assert (t.num_processes, t.gradient_accumulation_steps) == (4, 4)  # 32 = 2 per GPU x 4 GPUs x 4
    assert (t.sharding, t.nnodes) == ("fsdp", 1)  # full fine-tuning, FSDP2 over the 4 GPUs
    r = t.refinement
    assert (r.self_refine, r.decoupled, r.alpha, r.k_percent, r.window, r.warmup_fraction) == (
        True, True, 0.1, 10.0, 50, 0.2)
    assert [r.lam(i) for i in (1, 2, 3)] == [0.5, 0.25, 0.125]
    s = cfg.sample
    assert (s.backend, s.n, s.temperature, s.max_new_tokens) == ("vllm", 2, 0.7, 300)
    j = cfg.judge
    assert (j.type, j.reference, j.beta, j.length_penalty) == ("implicit", "init", 0.1, 0.0)
    assert cfg.evaluate.eval_set == "alpaca_eval"


def test_lora_preset_is_one_gpu_lora_bf16():
    cfg = load_config(ROOT / "configs" / "single_gpu_lora.yaml")
    assert cfg.train.num_processes == 1 and cfg.train.lora is not None and cfg.train.sharding == "none"
    assert cfg.train.precision == "bf16" and cfg.model.dtype == "bfloat16"


def test_70b_preset_is_8_gpus_lora_with_tensor_parallel_sampling():
    cfg = load_config(ROOT / "configs" / "llama70b_8gpu_lora.yaml")
    t, s = cfg.train, cfg.sample
    assert (t.num_processes, t.nnodes, t.gradient_accumulation_steps) == (8, 1, 4) and t.lora is not None
    assert (t.sharding, t.lora.base_dtype) == ("fsdp", "bfloat16")  # the base sharded in bf16: ~36 GB a GPU
    assert (s.backend, s.tensor_parallel_size, s.pipeline_parallel_size) == ("vllm", 4, 1)
    assert 8 % s.gpus_per_engine == 0 and "--shards 2" in header(ROOT / "configs" / "llama70b_8gpu_lora.yaml")


@pytest.mark.parametrize("path", [p for p in CONFIGS if "gpu" in p.name], ids=lambda p: p.name)
def test_gpu_presets_state_their_memory_per_gpu(path):
    text = header(path)
    assert "Memory" in text and "GB" in text and " B x P" in text  # the arithmetic, not just a number


@pytest.mark.parametrize(("preset", "compute"), [
    ("paper_zephyr_4gpu.yaml", ["world size 4 (4 processes), FSDP: parameters, gradients and optimiser state sharded"]),
    ("llama70b_8gpu_lora.yaml", ["world size 8 (8 processes), FSDP: the frozen base and the adapter sharded",
                                 "LoRA r 16, bf16 frozen base",
                                 "4 GPUs per engine (tensor parallel 4 x pipeline parallel 1)"]),
])
def test_spa_plan_accepts_the_scale_presets_and_shows_where_they_run(preset, compute, tmp_path):
    """`spa plan configs/<preset>` with the model folder and data it names stood in for (the preflight check wants
    them on disk): the three rounds, nothing run, no model loaded, and the world size, sharding and tensor
    parallelism each stage will use."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "prefs.jsonl").write_text("")
    spa = str(Path(sys.executable).parent / "spa")
    res = subprocess.run([spa, "plan", str(ROOT / "configs" / preset), "-s", f"run_dir={tmp_path / 'run'}",
                          "-s", f"model.pi_init={tmp_path / 'model'}", "-s", f"data.source={tmp_path / 'prefs.jsonl'}"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "3 iteration(s)" in res.stdout and "iteration 3" in res.stdout and "train/3 to run" in res.stdout, res.stdout
    for text in compute:
        assert text in res.stdout, res.stdout


@pytest.mark.parametrize(("name", "preset"), [("demo.yaml", "tiny"), ("smollm2.yaml", "smollm2")])
def test_demo_presets_equal_the_code(name, preset):
    path = ROOT / "configs" / name
    want = demo_config(DEMO_WORLD, DEMO_RUN, preset=preset)
    # the same keys and values as demo_config writes (nothing added that the code does not set) ...
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == want
    # ... and the same resolved config, every default included
    assert load_config(path).model_dump(mode="json") == parse_config(want).model_dump(mode="json")


def test_prefect_yaml_points_at_existing_configs():
    text = (ROOT / "prefect.yaml").read_text(encoding="utf-8")
    named = re.findall(r"configs/[\w.-]+\.yaml", text)
    assert named, "prefect.yaml names no config"
    assert all((ROOT / f).is_file() for f in named), named
    assert "configs/paper_zephyr_4gpu.yaml" in named


def test_spa_plan_accepts_the_real_model_preset(tmp_path):
    """configs/smollm2_ifeval.yaml with its files stood in for: the preflight passes (no win-rate set, the
    instruction-following sets and the verifier's task file exist), two rounds, and a missing task file is named."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for name in ("gold.jsonl", "tasks.jsonl", "dev.jsonl"):
        (tmp_path / name).write_text("")
    spa = str(Path(sys.executable).parent / "spa")
    over = ["-s", f"run_dir={tmp_path / 'run'}", "-s", f"model.pi_init={tmp_path / 'model'}",
            "-s", f"data.source={tmp_path / 'gold.jsonl'}", "-s", f"evaluate.instruction_sets=[{tmp_path / 'dev.jsonl'}, ifeval]"]
    preset = str(ROOT / "configs" / "smollm2_ifeval.yaml")
    res = subprocess.run([spa, "plan", preset, *over, "-s", f"judge.instructions={tmp_path / 'tasks.jsonl'}"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "2 iteration(s)" in res.stdout and "train/2 to run" in res.stdout, res.stdout
    missing = subprocess.run([spa, "plan", preset, *over, "-s", f"judge.instructions={tmp_path / 'nope.jsonl'}"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "judge.instructions" in missing.stderr and "nope.jsonl" in missing.stderr


def test_sspo_demo_preset_is_the_demo_plus_sspo():
    """configs/sspo_demo.yaml is configs/demo.yaml's run with SSPO as the seed stage (the arm `sspo_then_spa` of
    bench/demo_arms.py) on the world's unpaired set, in its own run directory; nothing else differs."""
    from spa.demo.arms import SEED_ARMS, merge
    from spa.demo.run import UNPAIRED_ROWS

    want = merge(demo_config(DEMO_WORLD, Path("runs/demo/sspo")),
                 SEED_ARMS["sspo_then_spa"] | {"data.unpaired_source": f"{DEMO_WORLD}/unpaired_{UNPAIRED_ROWS}.jsonl"})
    assert yaml.safe_load((ROOT / "configs" / "sspo_demo.yaml").read_text(encoding="utf-8")) == want
    assert load_config(ROOT / "configs" / "sspo_demo.yaml").train.loss == "sspo"


def test_every_demo_seed_arm_is_a_valid_config_that_sets_what_its_name_says():
    """The bench's seed-stage arms (spa.demo.arms.SEED_ARMS) validate as configs, so a misspelt key or value fails
    here rather than an hour into a bench; the SSPO-settings arms change exactly the setting they are named for."""
    from spa.demo.arms import SEED_ARMS, merge

    unpaired = {"data.unpaired_source": "pi_init"}  # the bench adds the world's unpaired set
    arm = lambda name: parse_config(merge(demo_config(DEMO_WORLD, Path("r")), unpaired | SEED_ARMS[name]))  # noqa: E731
    base = parse_config(demo_config(DEMO_WORLD, Path("r")))
    for name, over in SEED_ARMS.items():
        assert arm(name).train.loss == over["train.loss"], name
    sspo = lambda name: arm(name).train.sspo  # noqa: E731
    assert (sspo("sspo_min_chosen").threshold, sspo("sspo").threshold) == ("min_chosen", "kde")
    assert (sspo("sspo_decay001").decay, sspo("sspo_decay01").decay, sspo("sspo").decay) == (0.001, 0.01, 0.005)
    assert sspo("sspo_gold_only").decay == 0.0  # g = exp(0) = 1 at every step: the unpaired term's weight is 0
    assert sspo("sspo_implicit_then_spa").reward == "implicit" and base.train.loss == "dpo"

import pytest
import yaml

from spa.config import ConfigError, load_config, parse_config
from spa.run.layout import save_resolved


def minimal(tmp_path, **extra):
    raw = {"run_dir": str(tmp_path / "run"), "model": {"pi_init": "/models/sft"}}
    raw.update(extra)
    return raw


def test_paper_defaults(tmp_path):
    cfg = parse_config(minimal(tmp_path))
    t, r = cfg.train, cfg.train.refinement
    assert (t.beta, t.learning_rate, t.batch_size, t.seed_epochs, t.epochs, t.warmup_ratio) == (0.1, 5e-7, 32, 3, 1, 0.1)
    assert t.lr_scheduler == "cosine"
    assert (r.alpha, r.k_percent, r.window, r.warmup_fraction) == (0.1, 10.0, 50, 0.2)
    assert [r.lam(i) for i in (1, 2, 3, 4)] == [0.5, 0.25, 0.125, 0.0625]
    assert (cfg.sample.n, cfg.sample.temperature, cfg.sample.max_new_tokens) == (2, 0.7, 300)
    assert (cfg.judge.reference, cfg.judge.beta) == ("init", 0.1)
    assert cfg.iterations == 3 and cfg.data.prompt_sizes == [8000, 20000, 30000] and cfg.data.seed_size == 2000
    assert not cfg.model.trust_remote_code
    assert t.gradient_accumulation_steps == 8


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train.betta: Extra inputs are not permitted"):
        parse_config(minimal(tmp_path, train={"betta": 0.2}))


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"train": {"beta": -1}}, r"train.beta"),
        ({"train": {"refinement": {"k_percent": 150}}}, r"train.refinement.k_percent"),
        ({"sample": {"temperature": 0}}, r"sample.temperature"),
        ({"judge": {"reference": "sometimes"}}, r"judge.reference"),
        ({"train": {"batch_size": 30, "micro_batch_size": 4}}, r"multiple of micro_batch_size"),
        ({"iterations": 4}, r"needs 4 prompt_sizes"),
        ({"train": {"beta": "abc"}}, r"train.beta"),
        ({"judge": {"length_penalty": "sometimes"}}, r"length_penalty must be a number >= 0, or 'auto'"),
        ({"judge": {"length_penalty": -0.01}}, r"judge.length_penalty"),
        ({"judge": {"length_penalty_sign": "negative"}}, r"judge.length_penalty_sign"),
        ({"judge": {"length_penalty": "auto", "type": "llm_judge"}}, r"needs a judge with rewards"),
    ],
)
def test_out_of_range_values_are_errors(tmp_path, section, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(minimal(tmp_path, **section))


def test_missing_model_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model: Field required"):
        parse_config({"run_dir": str(tmp_path)})


def test_yaml_roundtrip_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(tmp_path, train={"beta": 0.05})))
    cfg = load_config(path, overrides={"train.refinement.alpha": 0.2})
    assert cfg.train.beta == 0.05 and cfg.train.refinement.alpha == 0.2
    saved = save_resolved(cfg)
    assert saved == tmp_path / "run" / "config.yaml"
    again = load_config(saved)
    assert again == cfg
    assert "learning_rate: 5.0e-07" in saved.read_text()


def test_config_is_frozen(tmp_path):
    cfg = parse_config(minimal(tmp_path))
    with pytest.raises(Exception, match="frozen"):
        cfg.train.beta = 1.0


def test_unreadable_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(path)


def test_section_hash_changes_only_with_its_section(tmp_path):
    a = parse_config(minimal(tmp_path))
    b = parse_config(minimal(tmp_path, sample={"seed": 1}))
    assert a.section_hash("train") == b.section_hash("train")
    assert a.section_hash("sample") != b.section_hash("sample")


def test_operational_settings_stay_out_of_the_resume_keys(tmp_path):
    """train.save_steps (checkpoint cadence) cannot change an output: no resume key covers it; the resolved
    config still holds it, and every other value of its section still counts."""
    from spa.config import OPERATIONAL

    assert "train.save_steps" in OPERATIONAL
    a = parse_config(minimal(tmp_path))
    b = parse_config(minimal(tmp_path, train={"save_steps": 7}))
    assert b.train.save_steps == 7 and a.section_hash("model", "train") == b.section_hash("model", "train")
    assert a.section_hash("train") != parse_config(minimal(tmp_path, train={"seed": 1})).section_hash("train")

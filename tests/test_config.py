import pytest

from gspo.config import Config, ConfigError, describe, load_config, save_config


def test_defaults_yaml_and_overrides_layer_in_that_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gspo:\n  group_size: 4\n  temperature: 1\noptim:\n  lr: 3.0e-6\n")
    cfg = load_config(f, ["gspo.group_size=6", "model.lora_target_modules=q_proj,v_proj", "data.path=none"])
    assert cfg.gspo.group_size == 6 and cfg.gspo.temperature == 1.0 and isinstance(cfg.gspo.temperature, float)
    assert cfg.optim.lr == 3e-6 and cfg.model.lora_target_modules == ["q_proj", "v_proj"] and cfg.data.path is None
    assert cfg.gspo.num_minibatches == 4 and cfg.gspo.clip_range() == (3e-4, 4e-4)
    assert load_config(None, ["gspo.importance_sampling_level=token"]).gspo.clip_range() == (0.2, 0.2)
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["gspo.group_size=abc"], "invalid config value gspo.group_size: expected int, got 'abc'"),
        (["gspo.group_size=2.5"], "invalid config value gspo.group_size: expected int, got 2.5"),
        (["gspo.bogus=1"], "unknown config field gspo.bogus"),
        (["gspo.importance_sampling_level=seq"], "gspo.importance_sampling_level: 'seq' is not one of"),
        (["gspo.num_minibatches=0"], "invalid config value gspo.num_minibatches"),
        (["train.progress=maybe"], "invalid config value train.progress: expected bool"),
        (["gspo.top_p=1.5"], "invalid config value gspo.top_p: must be <= 1, got 1.5"),
        (["gspo.group_size=1"], "invalid config value gspo.group_size: must be >= 2"),
        (["optim.lr=inf"], "invalid config value optim.lr: must be a finite number"),
        (["optim.lr=nan"], "invalid config value optim.lr: must be a finite number"),
        (["train.max_consecutive_skips=0"], "invalid config value train.max_consecutive_skips: must be >= 1"),
        (["train.checkpoint_every=-1"], "invalid config value train.checkpoint_every: must be >= 0"),
        (["warm_start.steps=-3"], "invalid config value warm_start.steps: must be >= 0"),
        (["warm_start.batch_size=0"], "invalid config value warm_start.batch_size: must be >= 1"),
        (["data.train_size=-5"], "invalid config value data.train_size: must be >= 0"),
        (["train.threads=-1"], "invalid config value train.threads: must be >= 0"),
        (["train.device=gpu0"], "invalid config value train.device: must be auto, cpu, cuda or cuda:N"),
        (["gspo.max_prompt_length=0"], "invalid config value gspo.max_prompt_length: must be >= 1"),
        (["optim.betas=[a]"], "invalid config value optim.betas: must be two numbers in [0, 1)"),
        (["optim.betas=[0.9, 1.5]"], "invalid config value optim.betas: must be two numbers in [0, 1)"),
        (
            ["gspo.num_minibatches=17", "gspo.prompts_per_step=4", "gspo.group_size=4"],
            "invalid config value gspo.num_minibatches: 17 updates need at least as many rows",
        ),
        (["optim.low_precision_update=round"], "optim.low_precision_update: 'round' is not one of"),
        (["nosuchsection.x=1"], "unknown config field nosuchsection"),
        (["gspo.group_size"], "expected section.field=value"),
        (
            ["eval.tasks=[arithmetic,mmlu]"],
            (
                "invalid config value eval.tasks: must be one or more of humaneval, gsm8k, "
                "hellaswag, arithmetic, got ['arithmetic', 'mmlu']"
            ),
        ),
        (["eval.tasks=[]"], "invalid config value eval.tasks: must be one or more of"),
        (
            ["eval.tasks=[gsm8k]"],
            "invalid config value pipeline.gate_metric: 'arithmetic' is not one of eval.tasks (gsm8k)",
        ),
        (["data.source=squad"], "data.source: 'squad' is not one of humaneval, gsm8k, hellaswag, arithmetic, custom"),
        (["pipeline.mlflow_wait=-1"], "invalid config value pipeline.mlflow_wait: must be >= 0"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_field(overrides, message):
    with pytest.raises(ValueError) as e:  # ConfigError is a ValueError
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("gspo:\n  group_size: 4\n  temperature: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_has_a_default_and_help_line():
    rows = describe()
    assert len(rows) > 50 and all(help_ for _, _, help_ in rows)
    assert Config().section_hash("gspo") != load_config(None, ["gspo.group_size=3"]).section_hash("gspo")
    assert Config().section_hash("gspo") == load_config(None, ["optim.lr=1"]).section_hash("gspo")

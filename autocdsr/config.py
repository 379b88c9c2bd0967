"""Typed run configuration: dataclass defaults, an optional YAML file, then key=value overrides
(OmegaConf does the merging and type checks). Unknown keys are an error listing the valid ones."""
from dataclasses import dataclass, field
from typing import List

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


@dataclass
class DataConfig:
    path: str = ""            # folder or .inter file; empty = the synthetic default
    name: str = ""            # NAME of NAME.{train,valid,test}.inter inside a folder
    split: str = "loo"        # loo | files
    max_len: int = 50
    mask_prob: float = 0.15   # BERT4Rec cloze masking
    train_windows: bool = False  # train on every max_len window of a user, not only the last
    mask_domain: str = "target"  # target: a [MASK] keeps its item's domain | hidden: wildcard
    domains: List[int] = field(default_factory=list)         # keep only these domains' events
    target_domains: List[int] = field(default_factory=list)  # evaluate only these targets
    synthetic_users: int = 3000
    synthetic_spurious: bool = True  # false: the control without the train-only shortcut


@dataclass
class ModelConfig:
    arch: str = "sasrec"      # sasrec | bert4rec
    layers: int = 2
    heads: int = 2
    hidden: int = 64
    dropout: float = 0.1
    head_dim: int = 0         # attention head width; 0 = hidden / heads
    ffn_hidden: int = 0       # feed-forward width; 0 = 4 x hidden
    item_bias: str = "none"   # none | zero | log_count: a learned per-item score offset
    bottleneck_tokens: int = 0     # AutoCDSR+: > 0 prepends learned IB tokens
    bottleneck_layers: int = -1    # -1 = half of the layers


@dataclass
class WeightingConfig:
    mode: str = "pareto"      # pareto | mgda | fixed | none
    lam: float = 0.1          # for mode=fixed
    every: int = 1            # reuse lambda for N steps
    shared: str = "reached"   # reached | all_but_items | all: the Gram matrix's parameters
    layers: List[int] = field(default_factory=list)  # layers whose mass enters L_cd; [] = all
    per_domain: bool = False  # one L_cd and one lambda per query domain
    gate: bool = False        # lambda = 0 on steps where the two gradients conflict (cos < 0)
    log_every: int = 50       # steps between device->host copies of lambda / cosine


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"      # auto | cpu | cuda
    loss: str = "full"        # full | sampled | inbatch | inbatch_official
    logits: str = "dot"       # full / sampled: dot | cosine (cos / temperature)
    temperature: float = 0.1  # for logits=cosine
    num_negatives: int = 1000  # sampled softmax
    patience: int = 3          # early stopping, in epochs without a better valid metric
    max_steps_per_epoch: int = 0  # 0 = the whole epoch
    max_bad_steps: int = 20     # non-finite steps in a row before the run stops
    checkpoint_every: int = 0   # also write last.pt every N steps (0 = at each epoch end)
    compile: bool = False       # run the whole step compiled (torch.compile, fullgraph)
    cuda_graph: bool = False    # capture the whole step as CUDA graphs and replay them
    prefetch: int = 2           # batches built ahead on a background thread (0 = none)


@dataclass
class EvalConfig:
    protocol: str = "full"    # full | uni100_vocab | uni999_domain
    ks: List[int] = field(default_factory=lambda: [5, 10, 20])
    batch_size: int = 256
    metric: str = "NDCG@10"   # early-stopping metric on the validation split


@dataclass
class AttentionConfig:
    backend: str = "auto"     # auto | reference | sdpa | triton


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: str = "base"   # base | autocdsr | autocdsr_plus
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    run_dir: str = "runs/latest"


CHOICES = {
    "data.split": ("loo", "files"),
    "model.arch": ("sasrec", "bert4rec"),
    "objective": ("base", "autocdsr", "autocdsr_plus"),
    "weighting.mode": ("pareto", "mgda", "fixed", "none"),
    "data.mask_domain": ("target", "hidden"),
    "weighting.shared": ("reached", "all_but_items", "all"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.loss": ("full", "sampled", "inbatch", "inbatch_official"),
    "train.logits": ("dot", "cosine"),
    "model.item_bias": ("none", "zero", "log_count"),
    "eval.protocol": ("full", "uni100_vocab", "uni999_domain"),
    "attention.backend": ("auto", "reference", "sdpa", "triton"),
}


class ConfigError(ValueError):
    """A configuration problem, phrased for the user."""


def valid_keys(node=None, prefix=""):
    node = OmegaConf.structured(Config) if node is None else node
    keys = []
    for key in node:
        value = node[key]
        full = f"{prefix}{key}"
        if OmegaConf.is_dict(value):
            keys += valid_keys(value, full + ".")
        else:
            keys.append(full)
    return keys


def _merge(base, other, source):
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        key = getattr(err, "full_key", "") or str(err)
        raise ConfigError(f"{source}: unknown config key '{key}'. Valid keys: "
                          f"{', '.join(valid_keys())}") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "")
        raise ConfigError(f"{source}: bad value for '{key}': {err.msg if hasattr(err, 'msg') else err}") from None


def load_config(config_file=None, overrides=(), base=None):
    """Defaults (or `base`, e.g. a resumed run's config), then the YAML file, then overrides."""
    cfg = OmegaConf.structured(Config) if base is None else OmegaConf.merge(
        OmegaConf.structured(Config), base)
    if config_file:
        try:
            file_cfg = OmegaConf.load(config_file)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {config_file}") from None
        except Exception as err:  # YAML syntax errors carry line numbers
            raise ConfigError(f"{config_file}: not valid YAML: {err}") from None
        cfg = _merge(cfg, file_cfg, config_file)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value. Valid keys: "
                              f"{', '.join(valid_keys())}")
        key = item.split("=", 1)[0]
        if key not in valid_keys():
            raise ConfigError(f"unknown config key '{key}'. Valid keys: {', '.join(valid_keys())}")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    check_config(cfg)
    return cfg


def check_config(cfg):
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got '{value}'")
    positive = ("data.max_len", "model.layers", "model.heads", "model.hidden",
                "train.epochs", "train.batch_size", "eval.batch_size", "weighting.every",
                "weighting.log_every")
    for key in positive:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    if cfg.data.max_len < 2:
        raise ConfigError(f"data.max_len must be >= 2 (a history and a target), got {cfg.data.max_len}")
    if cfg.model.head_dim < 0 or cfg.model.ffn_hidden < 0:
        raise ConfigError("model.head_dim and model.ffn_hidden must be >= 0 (0 = the default)")
    if not cfg.model.head_dim and cfg.model.hidden % cfg.model.heads:
        raise ConfigError(f"model.hidden ({cfg.model.hidden}) must be divisible by model.heads "
                          f"({cfg.model.heads}), or set model.head_dim")
    head_dim = cfg.model.head_dim or cfg.model.hidden // cfg.model.heads
    if not 16 <= head_dim <= 128:
        raise ConfigError(f"the attention head dim (model.head_dim, or model.hidden / "
                          f"model.heads) = {head_dim} must be in 16..128")
    if cfg.model.item_bias != "none" and (cfg.train.loss.startswith("inbatch")
                                          or cfg.train.logits == "cosine"):
        raise ConfigError("model.item_bias adds an offset to dot-product scores: it needs "
                          "train.loss=full or sampled with train.logits=dot")
    if cfg.train.prefetch < 0:
        raise ConfigError(f"train.prefetch must be >= 0 (0 = build each batch when needed), "
                          f"got {cfg.train.prefetch}")
    if cfg.train.temperature <= 0:
        raise ConfigError(f"train.temperature must be > 0, got {cfg.train.temperature}")
    if not 0.0 < cfg.data.mask_prob < 1.0:
        raise ConfigError(f"data.mask_prob must be in (0, 1), got {cfg.data.mask_prob}")
    if not cfg.eval.ks or min(cfg.eval.ks) < 1:
        raise ConfigError(f"eval.ks must be a non-empty list of positive ints, got {list(cfg.eval.ks)}")
    if cfg.objective == "autocdsr_plus":
        if cfg.model.arch != "bert4rec":
            raise ConfigError("objective=autocdsr_plus needs model.arch=bert4rec: with a causal "
                              "encoder the bottleneck tokens would carry future items back to "
                              "earlier positions (future leakage)")
        if cfg.model.bottleneck_tokens < 1:
            cfg.model.bottleneck_tokens = 4
    elif cfg.model.bottleneck_tokens > 0 and cfg.model.arch == "sasrec":
        raise ConfigError("model.bottleneck_tokens > 0 needs model.arch=bert4rec (a causal encoder "
                          "with bottleneck tokens leaks future items)")
    weighting = cfg.weighting
    if (weighting.per_domain or weighting.gate) and (cfg.objective == "base"
                                                    or weighting.mode not in ("pareto", "mgda")):
        raise ConfigError("weighting.per_domain and weighting.gate act on the solver's lambda: "
                          "they need objective=autocdsr or autocdsr_plus with weighting.mode="
                          "pareto or mgda")
    bad_layers = [i for i in weighting.layers if not 0 <= i < cfg.model.layers]
    if bad_layers:
        raise ConfigError(f"weighting.layers {bad_layers}: layer indices run from 0 to "
                          f"model.layers - 1 = {cfg.model.layers - 1}")
    if cfg.model.bottleneck_layers > cfg.model.layers:
        raise ConfigError(f"model.bottleneck_layers ({cfg.model.bottleneck_layers}) exceeds "
                          f"model.layers ({cfg.model.layers})")


def to_yaml(cfg):
    return OmegaConf.to_yaml(cfg)

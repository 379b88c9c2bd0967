"""Typed run configuration: dataclass defaults, an optional YAML file, then key=value overrides
(OmegaConf does the merging and type checks). Unknown keys are an error listing the valid ones."""
import difflib
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import List

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


def opt(default, help, factory=False):
    """A config field with its default and a one-line meaning (shown by `train --help`)."""
    if factory:
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """data.*: where the interactions come from and how they are split and batched."""
    path: str = opt("", "folder or .inter file; empty = the synthetic default")
    name: str = opt("", "NAME of NAME.{train,valid,test}.inter inside a folder")
    split: str = opt("loo", "loo | files")
    max_len: int = opt(50, "the most recent events a model reads")
    mask_prob: float = opt(0.15, "BERT4Rec cloze masking")
    train_windows: bool = opt(False, "train on every max_len window of a user, not only the last")
    domain_views: bool = opt(False, "also train on each training sequence's single-domain "
                                    "subsequences (one per domain it mixes)")
    mask_domain: str = opt("target", "target: a [MASK] keeps its item's domain | hidden: wildcard")
    domains: List[int] = opt(list, "keep only these domains' events", factory=True)
    target_domains: List[int] = opt(list, "evaluate only these targets", factory=True)
    shared_targets: bool = opt(False, "with data.domains: only targets an all-domain run also "
                                      "has, to compare single- and cross-domain runs")
    synthetic_users: int = opt(3000, "users of the synthetic default data")
    synthetic_spurious: bool = opt(True, "false: the control without the train-only shortcut")
    synthetic_mode: str = opt("positive", "positive: the default data | negative: adds a domain "
                                          "(3) that cross-domain attention hurts")


@dataclass
class ModelConfig:
    """model.*: the backbone and its size."""
    arch: str = opt("sasrec", "sasrec | bert4rec")
    layers: int = opt(2, "transformer blocks")
    heads: int = opt(2, "attention heads")
    hidden: int = opt(64, "embedding and hidden width")
    dropout: float = opt(0.1, "dropout after embeddings, attention and FFN")
    head_dim: int = opt(0, "attention head width; 0 = hidden / heads")
    ffn_hidden: int = opt(0, "feed-forward width; 0 = 4 x hidden")
    item_bias: str = opt("none", "none | zero | log_count: a learned per-item score offset")
    bottleneck_tokens: int = opt(0, "AutoCDSR+'s learned IB tokens; 0 = 4 with objective="
                                    "autocdsr_plus (no other objective has any)")
    bottleneck_layers: int = opt(-1, "-1 = half of the layers")


@dataclass
class WeightingConfig:
    """weighting.*: how L_cd is weighed against L_rec."""
    mode: str = opt("pareto", "pareto | mgda | fixed | none")
    lam: float = opt(0.1, "for mode=fixed")
    every: int = opt(1, "reuse lambda for N steps")
    shared: str = opt("reached", "reached | last_layer | all_but_items | all: the Gram matrix's parameters")
    layers: List[int] = opt(list, "layers whose mass enters L_cd; [] = all", factory=True)
    per_domain: bool = opt(False, "one L_cd and one lambda per query domain")
    gate: bool = opt(False, "lambda = 0 on steps where the two gradients conflict (cos < 0)")
    held_out: bool = opt(False, "gate on held-out data: lambda = 0 while the running cosine "
                                "between g_cd and a validation batch's L_rec gradient is < 0")
    log_every: int = opt(50, "steps between device->host copies of lambda / cosine")


@dataclass
class TrainConfig:
    """train.*: the optimisation and the step's execution mode."""
    epochs: int = opt(10, "training epochs (fewer with early stopping)")
    batch_size: int = opt(128, "sequences per step (the global batch under torchrun)")
    lr: float = opt(1e-3, "AdamW peak learning rate")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay")
    warmup_steps: int = opt(100, "linear warm-up (at most a tenth of all steps), then linear decay to 10 %")
    grad_clip: float = opt(1.0, "clip the update's global norm to this")
    seed: int = opt(0, "seeds weights, batches, dropout and the evaluation negatives")
    device: str = opt("auto", "auto | cpu | cuda")
    loss: str = opt("full", "full | sampled | inbatch | inbatch_official")
    logits: str = opt("dot", "full / sampled: dot | cosine (cos / temperature)")
    temperature: float = opt(0.1, "for logits=cosine")
    num_negatives: int = opt(1000, "sampled softmax")
    negatives: str = opt("uniform", "sampled softmax: uniform (over every item) | domain "
                                    "(from the target's domain) | mixed (both sets)")
    domain_balance: float = opt(0.0, "loss weight of a target of domain d: (n_max / n_d) ** this "
                                     "(n_d: d's training events); 0 = every target alike, 1 = "
                                     "every domain the same total weight")
    domain_weight_max: float = opt(20.0, "the largest domain loss weight (train.domain_balance)")
    patience: int = opt(3, "early stopping, in epochs without a better valid metric")
    max_steps_per_epoch: int = opt(0, "0 = the whole epoch")
    max_bad_steps: int = opt(20, "non-finite steps in a row before the run stops")
    checkpoint_every: int = opt(0, "also write last.pt every N steps (0 = at each epoch end)")
    compile: bool = opt(False, "run the whole step compiled (torch.compile, fullgraph)")
    cuda_graph: bool = opt(False, "capture the whole step as CUDA graphs and replay them")
    prefetch: int = opt(2, "batches built ahead on a background thread (0 = none)")


@dataclass
class EvalConfig:
    """eval.*: the ranking protocol and metrics."""
    protocol: str = opt("full", "full | full_domain | uni100_vocab | uni999_domain")
    ks: List[int] = opt(lambda: [5, 10, 20], "cut-offs K of HR@K and NDCG@K", factory=True)
    batch_size: int = opt(256, "evaluation rows per batch")
    negative_draws: int = opt(1, "sampled protocols: metrics averaged over this many negative "
                                 "sets per target (1 = the protocol as published)")
    metric: str = opt("NDCG@10", "early-stopping metric on the validation split")
    history: str = opt("all", "all | target_domain: score from each history's events of the "
                              "target's domain only (a diagnostic: how much the model's "
                              "prediction rests on the other domains' events)")


@dataclass
class AttentionConfig:
    """attention.*: which attention backend the model runs."""
    backend: str = opt("auto", "auto | reference | sdpa | triton")


@dataclass
class Config:
    """A whole run's configuration (every section, the objective and the run folder)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: str = opt("base", "base | autocdsr | autocdsr_plus")
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    run_dir: str = opt("runs/latest", "where config.yaml, metrics.json, best.pt, last.pt go")


# Every key with a fixed set of values, written once: the modules that act on them (losses,
# models, evaluation) read their lists from here, so that this torch-free module can reject a
# bad value before torch is imported. attention.backend restates kernels' backends (kernels
# imports nothing from autocdsr, and importing kernels means importing torch); a test checks
# that the two agree.
CHOICES = {
    "data.split": ("loo", "files"),
    "data.synthetic_mode": ("positive", "negative"),
    "model.arch": ("sasrec", "bert4rec"),
    "objective": ("base", "autocdsr", "autocdsr_plus"),
    "weighting.mode": ("pareto", "mgda", "fixed", "none"),
    "data.mask_domain": ("target", "hidden"),
    "weighting.shared": ("reached", "last_layer", "all_but_items", "all"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.loss": ("full", "sampled", "inbatch", "inbatch_official"),
    "train.negatives": ("uniform", "domain", "mixed"),
    "train.logits": ("dot", "cosine"),
    "model.item_bias": ("none", "zero", "log_count"),
    "eval.protocol": ("full", "full_domain", "uni100_vocab", "uni999_domain"),
    "eval.history": ("all", "target_domain"),
    "attention.backend": ("auto", "reference", "sdpa", "triton"),
}


class ConfigError(ValueError):
    """A configuration problem, phrased for the user."""


def valid_keys(node=None, prefix=""):
    """Every dotted config key, in definition order."""
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


def key_help(cls=Config, prefix=""):
    """[(dotted key, default, meaning)] of every config key, from the dataclass definitions."""
    rows = []
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            rows += key_help(type(default), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", default, f.metadata.get("help", "")))
    return rows


def keys_text():
    """The override keys as a table for --help: key=default and the meaning."""
    rows = [(f"{key}={_show(default)}", meaning) for key, default, meaning in key_help()]
    width = max(len(left) for left, _ in rows)
    return "\n".join(f"  {left:<{width}}  {meaning}" for left, meaning in rows)


def _show(value):
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def _unknown_key(key, source=""):
    near = difflib.get_close_matches(key, valid_keys(), n=2, cutoff=0.8)
    hint = f" Did you mean {' or '.join(near)}?" if near else ""
    where = f"{source}: " if source else ""
    return ConfigError(f"{where}unknown config key '{key}'.{hint} (`autocdsr train --help` "
                       "lists every key with its default)")


def _merge(base, other, source):
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        raise _unknown_key(getattr(err, "full_key", "") or str(err), source) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "")
        message = str(getattr(err, "msg", err)).strip().splitlines()[0]
        raise ConfigError(f"{source}: bad value for '{key}': {message}") from None


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
            raise ConfigError(f"override '{item}' must look like key=value "
                              "(`autocdsr train --help` lists the keys)")
        key = item.split("=", 1)[0]
        if key not in valid_keys():
            raise _unknown_key(key)
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    check_config(cfg)
    return cfg


def bottleneck_tokens(cfg):
    """The IB tokens a run's model gets: model.bottleneck_tokens, or 4 when that is 0, with
    objective=autocdsr_plus; none with any other objective."""
    if cfg.objective != "autocdsr_plus":
        return 0
    return cfg.model.bottleneck_tokens or 4


def check_config(cfg):
    """Raise ConfigError for a value or a combination of values that cannot run."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got '{value}'")
    positive = ("data.max_len", "model.layers", "model.heads", "model.hidden",
                "train.epochs", "train.batch_size", "eval.batch_size", "eval.negative_draws",
                "weighting.every",
                "weighting.log_every")
    for key in positive:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    if cfg.data.shared_targets and not cfg.data.domains:
        raise ConfigError("data.shared_targets=true needs data.domains (the single-domain run)")
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
    if cfg.train.negatives != "uniform" and cfg.train.loss != "sampled":
        raise ConfigError(f"train.negatives={cfg.train.negatives} chooses the sampled softmax's "
                          f"negatives: it needs train.loss=sampled, got {cfg.train.loss}")
    if cfg.train.domain_balance < 0 or cfg.train.domain_weight_max < 1:
        raise ConfigError(f"train.domain_balance must be >= 0 and train.domain_weight_max >= 1, "
                          f"got {cfg.train.domain_balance} and {cfg.train.domain_weight_max}")
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
    elif cfg.model.bottleneck_tokens > 0 and cfg.model.arch == "sasrec":
        raise ConfigError("model.bottleneck_tokens > 0 needs model.arch=bert4rec (a causal encoder "
                          "with bottleneck tokens leaks future items)")
    weighting = cfg.weighting
    if (weighting.per_domain or weighting.gate or weighting.held_out) and (
            cfg.objective == "base" or weighting.mode not in ("pareto", "mgda")):
        raise ConfigError("weighting.per_domain, weighting.gate and weighting.held_out act on "
                          "the solver's lambda: they need objective=autocdsr or autocdsr_plus "
                          "with weighting.mode=pareto or mgda")
    if weighting.gate and weighting.held_out:
        raise ConfigError("weighting.gate (the training batch's cosine) and weighting.held_out "
                          "(a validation batch's) are two gates: choose one")
    bad_layers = [i for i in weighting.layers if not 0 <= i < cfg.model.layers]
    if bad_layers:
        raise ConfigError(f"weighting.layers {bad_layers}: layer indices run from 0 to "
                          f"model.layers - 1 = {cfg.model.layers - 1}")
    if cfg.model.bottleneck_layers > cfg.model.layers:
        raise ConfigError(f"model.bottleneck_layers ({cfg.model.bottleneck_layers}) exceeds "
                          f"model.layers ({cfg.model.layers})")


def to_yaml(cfg):
    """The config as YAML text (what a run folder's config.yaml holds)."""
    return OmegaConf.to_yaml(cfg)

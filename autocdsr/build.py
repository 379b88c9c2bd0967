"""What every command builds from a config: the device, the seeds, the data and the model, and
a checkpoint's (config, data, model) for evaluation, serving and analysis (no optimizer, no
training step, no process group)."""
import random

import numpy as np
import torch
from omegaconf import OmegaConf

from .checkpoint import load_safe
from .config import bottleneck_tokens, load_config
from .data.dataset import (build_leave_one_out, keep_domains, keep_shared_targets,
                           keep_target_domains, last_two_domains, load_dataset)
from .data.synthetic import generate
from .data.synthetic_negative import generate_negative
from .models import Recommender


def resolve_device(name):
    """torch.device for train.device (auto: CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed):
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(cfg):
    """The dataset (data.domains and data.target_domains applied), and the synthetic
    generator's oracle state (None for real data)."""
    domains = list(cfg.data.domains)
    if not cfg.data.path:
        if cfg.data.synthetic_mode == "negative":
            frame = generate_negative(cfg.data.synthetic_users, seed=cfg.train.seed)
        else:
            frame = generate(cfg.data.synthetic_users, seed=cfg.train.seed,
                             spurious=cfg.data.synthetic_spurious)
        data = build_leave_one_out(keep_domains(frame, domains), "synthetic")
        if cfg.data.shared_targets:
            data = keep_shared_targets(data, last_two_domains(frame), domains)
        oracle = None if domains else frame["oracle"]  # its cursors assume every domain
    else:
        data = load_dataset(cfg.data.path, cfg.data.name, cfg.data.split, domains,
                            cfg.data.shared_targets)
        oracle = None
    return keep_target_domains(data, list(cfg.data.target_domains)), oracle


def build_model(cfg, data):
    """The recommender a config describes, for this data's items and domains (bottleneck
    tokens only for objective=autocdsr_plus; a log-count item bias started from the training
    counts)."""
    model_cfg = cfg.model.copy()
    model_cfg.bottleneck_tokens = bottleneck_tokens(cfg)
    model = Recommender(model_cfg, data.num_items, data.num_domains, cfg.data.max_len,
                        backend=cfg.attention.backend, mask_domain=cfg.data.mask_domain)
    if cfg.model.item_bias == "log_count":  # start from the training popularity's ranking
        with torch.no_grad():
            counts = torch.as_tensor(data.popularity[: data.num_items + 1], dtype=torch.float32)
            model.item_bias.copy_(torch.log1p(counts))
    return model


def load_checkpoint(path, overrides=(), device="cpu"):
    """(cfg, data, model in eval mode) of a checkpoint (best.pt / last.pt); overrides apply
    on top of the run's own config (e.g. eval.protocol=...)."""
    state = load_safe(path, map_location=device)
    cfg = load_config(None, overrides, base=OmegaConf.create(state["config"]))
    data, _ = load_data(cfg)
    model = build_model(cfg, data).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return cfg, data, model

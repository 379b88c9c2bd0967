"""Command line: `autocdsr train [--config FILE] [--resume RUN_DIR] [key=value ...]` and
`autocdsr evaluate --checkpoint RUN_DIR/best.pt [key=value ...]`."""
import argparse
import json
import os
import sys

from omegaconf import OmegaConf

from .checkpoint import CheckpointError, load_safe
from .config import ConfigError, load_config
from .data.reader import DataError


def _train(args):
    from .train import train
    resume_state = None
    if args.resume:
        resume_state = load_safe(os.path.join(args.resume, "last.pt"))
        base = OmegaConf.create(resume_state["config"])
        cfg = load_config(args.config, args.overrides, base=base)
        cfg.run_dir = args.resume
    else:
        cfg = load_config(args.config, args.overrides)
    metrics = train(cfg, resume_state)
    print(json.dumps({"protocol": metrics["protocol"], "test": metrics["test"]["overall"]}))


def _evaluate(args):
    from .evaluate import format_table
    from .train import Trainer, setup_logging
    state = load_safe(args.checkpoint)
    cfg = load_config(None, args.overrides, base=OmegaConf.create(state["config"]))
    setup_logging(os.path.dirname(os.path.abspath(args.checkpoint)))
    trainer = Trainer(cfg)
    trainer.model.load_state_dict(state["model"])
    for name, split in (("valid", trainer.data.valid), ("test", trainer.data.test)):
        result = trainer.evaluate(split, name)
        print(format_table(f"{trainer.data.name} {cfg.model.arch} | {name}", cfg.eval.protocol,
                           result, list(cfg.eval.ks)))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="autocdsr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model (synthetic data by default)")
    p_train.add_argument("--config", help="YAML config file")
    p_train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p_train.add_argument("overrides", nargs="*", help="key=value, e.g. model.arch=bert4rec")
    p_eval = sub.add_parser("evaluate", help="evaluate a checkpoint")
    p_eval.add_argument("--checkpoint", required=True)
    p_eval.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        (_train if args.command == "train" else _evaluate)(args)
    except (ConfigError, DataError, CheckpointError, FloatingPointError, ValueError) as err:
        print(f"autocdsr: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line:
  autocdsr train     [--config FILE] [--resume RUN_DIR] [key=value ...]
  autocdsr evaluate  --checkpoint RUN_DIR/best.pt [key=value ...]
  autocdsr analyze   RUN_DIR [--against RUN_DIR ...]
  autocdsr compare   RUN_DIR ... [--group-by KEYS] [--baseline GROUP] [--out DIR]
  autocdsr transfer  CROSS_RUN_DIR ... --single D=RUN_DIR ... [--out DIR]
  autocdsr recommend --checkpoint RUN_DIR/best.pt --k K --out recs.tsv [--users FILE] [--domain D]
  autocdsr export    --checkpoint RUN_DIR/best.pt --out DIR
"""
import argparse
import json
import os
import sys

from omegaconf import OmegaConf

from .compare import DEFAULT_GROUP_BY
from .config import keys_text, load_config

# Only the configuration is imported up front, so a bad argument or --help answers at once;
# each command imports what it needs (torch among it). Every user-facing error (config, data,
# checkpoint, compare, serve) is a ValueError subclass.


def _train(args):
    if args.config and not os.path.isfile(args.config):
        raise ValueError(f"config file not found: {args.config}")
    if args.resume and not os.path.isfile(os.path.join(args.resume, "last.pt")):
        raise ValueError(f"--resume {args.resume}: no last.pt there to resume from")
    if not args.resume:  # checked before the heavy imports
        cfg = load_config(args.config, args.overrides)
        if cfg.data.path and not os.path.exists(cfg.data.path):
            raise ValueError(f"data.path={cfg.data.path}: no such file or folder")
    from .checkpoint import load_safe
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
    if not os.path.isfile(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint}: no such file")
    from .reevaluate import reevaluate
    reevaluate(args.checkpoint, args.overrides, args.out)
    if args.out:
        print(f"wrote {args.out}/config.yaml, metrics.json")


def _analyze(args):
    from .analyze import analyze
    out = analyze(args.run_dir, args.against, args.max_rows, args.single)
    extra = ", strata.json, strata.png" if args.single else ""
    print(f"wrote {out}/pair_mass.json, pair_mass.png, trajectory.png{extra}")


def _compare(args):
    from .compare import compare
    text, _ = compare(args.run_dirs, args.group_by.split(","), args.baseline,
                      args.metrics.split(","), args.out)
    print(text)


def _transfer(args):
    from .compare import transfer_table
    single = {}
    for item in args.single:
        domain, _, run_dir = item.partition("=")
        if not domain.isdigit() or not run_dir:
            raise ValueError(f"--single {item}: expected DOMAIN=RUN_DIR (a domain token, "
                             f"e.g. 4=runs/single4)")
        single.setdefault(int(domain), []).append(run_dir)
    text, _ = transfer_table(args.cross, single, args.metrics.split(","))
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "transfer.md"), "w") as f:
            f.write(text + "\n")


def _recommend(args):
    from .serve import recommend
    lines = recommend(args.checkpoint, args.k, args.out, args.users, args.domain,
                      args.include_history)
    print(f"wrote {lines} recommendations to {args.out}")


def _export(args):
    from .serve import export
    meta = export(args.checkpoint, args.out)
    print(f"wrote {meta['num_items']} item and {meta['num_users']} user vectors to {args.out}")


def main(argv=None):
    """The `autocdsr` command; returns the exit status (2 for a user error, printed on one line)."""
    parser = argparse.ArgumentParser(prog="autocdsr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model (synthetic data by default)",
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog="config keys (key=default, then the meaning):\n" + keys_text())
    p_train.add_argument("--config", help="YAML config file")
    p_train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p_train.add_argument("overrides", nargs="*", metavar="key=value",
                         help="config overrides, e.g. model.arch=bert4rec (keys below)")
    p_eval = sub.add_parser("evaluate", help="evaluate a checkpoint")
    p_eval.add_argument("--checkpoint", required=True)
    p_eval.add_argument("--out", metavar="DIR",
                        help="also write config.yaml + metrics.json there (a run folder for compare)")
    p_eval.add_argument("overrides", nargs="*", metavar="key=value",
                        help="on top of the run's config, e.g. eval.negative_draws=10")
    p_an = sub.add_parser("analyze", help="attention-mass figures and the weight trajectory")
    p_an.add_argument("run_dir")
    p_an.add_argument("--against", nargs="*", default=[], metavar="RUN_DIR")
    p_an.add_argument("--max-rows", type=int, default=512, help="test histories to analyse")
    p_an.add_argument("--single", metavar="RUN_DIR",
                      help="a single-domain run of the same backbone: adds the outcome strata")
    p_cmp = sub.add_parser("compare", help="one table of runs, mean +- std over seeds")
    p_cmp.add_argument("run_dirs", nargs="+")
    p_cmp.add_argument("--group-by", default=",".join(DEFAULT_GROUP_BY))
    p_cmp.add_argument("--baseline", help="group label or key=value,... (default objective=base)")
    p_cmp.add_argument("--metrics", default="HR@10,NDCG@10")
    p_cmp.add_argument("--out", help="folder for compare.md and compare.csv")
    p_tr = sub.add_parser("transfer", help="negative transfer per domain: single-domain runs "
                                           "against the cross-domain base on the same targets")
    p_tr.add_argument("cross", nargs="+", metavar="CROSS_RUN_DIR",
                      help="the cross-domain base runs, one per seed")
    p_tr.add_argument("--single", nargs="+", action="extend", required=True, metavar="D=RUN_DIR",
                      help="single-domain runs (data.domains=[D] data.shared_targets=true); "
                           "repeat the flag or list several")
    p_tr.add_argument("--metrics", default="HR@10,NDCG@10")
    p_tr.add_argument("--out", help="folder for transfer.md")
    p_rec = sub.add_parser("recommend", help="top-K items per user, as TSV")
    p_rec.add_argument("--checkpoint", required=True)
    p_rec.add_argument("--k", type=int, default=10)
    p_rec.add_argument("--out", required=True)
    p_rec.add_argument("--users", help="file with one user token per line (default: every user)")
    p_rec.add_argument("--domain", help="recommend only items of this domain token")
    p_rec.add_argument("--include-history", action="store_true",
                       help="keep items the user has already interacted with")
    p_exp = sub.add_parser("export", help="item embeddings and user states as .npy")
    p_exp.add_argument("--checkpoint", required=True)
    p_exp.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    commands = {"train": _train, "evaluate": _evaluate, "analyze": _analyze, "compare": _compare,
                "transfer": _transfer, "recommend": _recommend, "export": _export}
    try:
        commands[args.command](args)
    except (FloatingPointError, ValueError) as err:
        print(f"autocdsr: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

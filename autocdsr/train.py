"""Training: one loop for every objective, with progress bars, early stopping, a run
directory (config.yaml, metrics.json, best.pt, last.pt, train.log) and exact resume."""
import json
import logging
import math
import os
import platform
import re
import subprocess
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import load_safe, save_atomic, write_text_atomic
from .config import to_yaml
from . import distributed
from .data.batches import (bert4rec_train_batch, held_out_batch, sasrec_train_batch, shard_batch,
                           to_device)
from .data.prefetch import prefetched
from .build import build_model, load_data, resolve_device, seed_everything
from .data.dataset import training_windows, with_domain_views
from .data.synthetic import oracle_table
from .evaluate import (evaluate_split, format_table, model_scorer, popularity_scorer,
                       table_scorer, uses_cosine)
from .optim import make_optimizer
from .step import STEP_STATS, TrainStep

log = logging.getLogger("autocdsr")


def environment_record():
    """Package versions and the git commit, stored with every run for reproducibility."""
    record = {"python": platform.python_version(), "torch": torch.__version__,
              "numpy": np.__version__}
    try:
        import triton
        record["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        record["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here,
                                              capture_output=True, text=True,
                                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        record["git_commit"] = None
    return record


# The step updates the parameters itself (autocdsr.step), not through optimizer.step(), which
# the scheduler's order check cannot see: the schedule is applied as intended.
warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))


class Trainer:
    """One training run: data, model, optimizer, scheduler and step, the epoch loop, evaluation and
    the run folder."""
    def __init__(self, cfg, data=None):
        self.cfg = cfg
        self.comm, device = distributed.init(cfg.train.device)
        self.device = device or resolve_device(cfg.train.device)
        if cfg.train.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"train.cuda_graph=true needs a CUDA device (this run is on "
                             f"{self.device}); train with train.cuda_graph=false")
        if cfg.train.batch_size % self.comm.world:
            raise ValueError(f"train.batch_size ({cfg.train.batch_size}) is the global batch and "
                             f"must be divisible by the number of processes ({self.comm.world})")
        seed_everything(cfg.train.seed)
        t0 = time.perf_counter()
        self.data, self.oracle = (data, None) if data is not None else load_data(cfg)
        self.load_seconds = time.perf_counter() - t0
        if cfg.data.domain_views:
            self.data.train = with_domain_views(self.data.train)
        if cfg.data.train_windows:  # SASRec's window holds max_len inputs and one more target
            window = cfg.data.max_len + (1 if cfg.model.arch == "sasrec" else 0)
            self.data.train = training_windows(self.data.train, window)
        if len(self.data.train) < 1:
            raise ValueError("no training sequences")
        self.model = build_model(cfg, self.data).to(self.device)
        if self.comm.active:  # the seeds already agree; rank 0's weights make sure of it
            for tensor in self.model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        self.optimizer = make_optimizer(self.model, cfg.train,
                                        fused=not (cfg.train.compile or cfg.train.cuda_graph))
        self.steps_per_epoch = math.ceil(len(self.data.train) / cfg.train.batch_size)
        if cfg.train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        total = self.steps_per_epoch * cfg.train.epochs
        warmup = min(cfg.train.warmup_steps, max(1, total // 10))
        # linear warmup, then linear decay to 10% of the peak learning rate
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / warmup,
                                          max(0.1, 1 - 0.9 * (s - warmup) / max(1, total - warmup))))
        self.amp_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.step = TrainStep.from_config(self.model, self.optimizer, cfg,
                                          amp_dtype=self.amp_dtype, comm=self.comm,
                                          domain_items=self.data.domain_items,
                                          domain_counts=self.data.training_domain_counts())
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_metric, self.best_epoch, self.bad_epochs = -1.0, 0, 0
        self.history, self.pending = [], []
        self.skipped_steps = 0
        # the columns of a queued step-stats row (copied to the host in batches), by name
        self.domain_names = [str(t) for t in self.data.domain_tokens] \
            if cfg.weighting.per_domain else []
        self.stat_columns = [*STEP_STATS, "bad_in_row"] + \
            [f"lambda@{d}" for d in self.domain_names] + [f"cosine@{d}" for d in self.domain_names]
        self.epoch_sums = self._zero_sums()

    # ------------------------------------------------------------------ state
    def _zero_sums(self):
        sums = {"n": 0, "seconds": 0.0}
        sums.update({name: 0.0 for name in self.stat_columns
                     if name not in ("skipped", "bad_in_row")})
        return sums

    def state(self):
        """Everything needed to resume the run exactly (weights, optimizer, scheduler, counters,
        RNG)."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "balanced": self.step.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "best_metric": self.best_metric,
            "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "history": json.dumps(self.history), "epoch_sums": json.dumps(self.epoch_sums),
            "skipped_steps": self.skipped_steps, "world_size": self.comm.world,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": to_yaml(self.cfg),
        }

    def load_state(self, state):
        """Restore state()'s content (refused on another number of processes)."""
        if state.get("world_size", 1) != self.comm.world:
            raise ValueError(f"this run was trained on {state.get('world_size', 1)} processes; "
                             f"resume it on as many (got {self.comm.world}): the global batch "
                             "is split by rows across them")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step.load_state_dict(state["balanced"])
        for key in ("epoch", "step_in_epoch", "global_step", "best_metric", "best_epoch",
                    "bad_epochs", "skipped_steps"):
            setattr(self, key, state[key])
        self.history = json.loads(state["history"])
        self.epoch_sums = {_current_name(k): v for k, v in json.loads(state["epoch_sums"]).items()}
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # ------------------------------------------------------------------ steps
    def _host_batch(self, epoch, order, index):
        """Training batch `index` of `epoch`, on the host: a pure function of its arguments
        (safe to build ahead, on another thread)."""
        cfg, data = self.cfg, self.data
        rows = order[index * cfg.train.batch_size:(index + 1) * cfg.train.batch_size]
        if len(rows) < cfg.train.batch_size:  # fixed shapes: empty rows fill the last batch
            rows = np.r_[rows, np.full(cfg.train.batch_size - len(rows), -1)]
        if cfg.model.arch == "sasrec":
            batch = sasrec_train_batch(data.train, rows, cfg.data.max_len)
        else:
            rng = np.random.default_rng([cfg.train.seed, epoch, index])  # resumable masking
            batch = bert4rec_train_batch(data.train, rows, cfg.data.max_len, self.model.tokens,
                                         cfg.data.mask_prob, rng)
        if cfg.weighting.held_out:  # the held-out gate's batch: validation rows, drawn anew
            rng = np.random.default_rng([cfg.train.seed, epoch, index, 1])
            rows = rng.integers(len(data.valid), size=cfg.train.batch_size)
            batch.update(held_out_batch(data.valid, rows, cfg.data.max_len, cfg.model.arch,
                                        self.model.tokens))
        if self.comm.active:  # this rank's rows of the global batch
            batch = shard_batch(batch, self.comm.rank, self.comm.world)
        return batch

    def _epoch_batches(self, order):
        """This epoch's remaining batches on the device, built train.prefetch ahead."""
        epoch, steps = self.epoch, range(self.step_in_epoch, self.steps_per_epoch)
        depth = self.cfg.train.prefetch
        if depth:
            host = prefetched(lambda i: self._host_batch(epoch, order, i), steps, depth,
                              pin=self.device.type == "cuda")
        else:
            host = (self._host_batch(epoch, order, i) for i in steps)
        for batch in host:
            yield to_device(batch, self.device)

    def train_step(self, batch):
        """One optimizer step and one scheduler step; the step's scalars are queued on the device.
        """
        out = self.step(batch)
        self.scheduler.step()
        row = [out[name] for name in STEP_STATS] + [self.step.bad_in_row.float()]
        if self.domain_names:
            row += [*out["lambda_per_domain"].unbind(), *out["cosine_per_domain"].unbind()]
        self.pending.append(torch.stack(row))

    def _flush(self):
        """Copy the queued per-step scalars to the host in one transfer; stop the run after
        train.max_bad_steps non-finite (skipped) steps in a row."""
        if not self.pending:
            return None
        table = torch.stack(self.pending).cpu().numpy()
        self.pending = []
        values = {name: table[:, i] for i, name in enumerate(self.stat_columns)}
        skipped, in_row = values["skipped"], values["bad_in_row"]
        sums = self.epoch_sums
        finite = skipped == 0  # skipped steps carry NaN losses: left out of the means
        for key in sums:
            if key in values:
                sums[key] += float(values[key][finite].sum())
        sums["n"] += int(finite.sum())
        self.skipped_steps += int(skipped.sum())
        if skipped.any():
            log.warning("non-finite loss or gradient: %d steps skipped so far (%d in a row)",
                        self.skipped_steps, int(in_row[-1]))
        if in_row[-1] >= self.cfg.train.max_bad_steps:
            raise FloatingPointError(
                f"{int(in_row[-1])} non-finite steps in a row: stopping; the last checkpoint "
                f"is {os.path.join(self.cfg.run_dir, 'last.pt')} (the skipped steps never "
                f"reached the weights)")
        return {name: column[-1] for name, column in values.items()}

    # ------------------------------------------------------------------ loop
    def save(self, name):
        """Write the resumable state to run_dir/name (rank 0 only)."""
        if self.comm.main:  # one writer for the run directory
            save_atomic(self.state(), os.path.join(self.cfg.run_dir, name))

    def evaluate(self, split, desc, scorer=None):
        """Metrics of one split; with data parallelism each rank scores a share of the rows
        and every rank gets the gathered, identical result."""
        self.model.eval()
        scorer = scorer or model_scorer(self.model, self.amp_dtype, uses_cosine(self.cfg))
        return evaluate_split(scorer, self.data, split, self.cfg, self.device, desc, self.comm)

    def fit(self):
        """The epoch loop with validation and early stopping; then finish()."""
        cfg = self.cfg
        if self.comm.main:
            os.makedirs(cfg.run_dir, exist_ok=True)
            write_text_atomic(to_yaml(cfg), os.path.join(cfg.run_dir, "config.yaml"))
            record = dict(environment_record(), world_size=self.comm.world)
            write_text_atomic(json.dumps(record, indent=1),
                              os.path.join(cfg.run_dir, "environment.json"))
        log.info("%s | load %.1fs | device %s | %d steps/epoch", self.data.summary(),
                 self.load_seconds, self.device, self.steps_per_epoch)
        if self.step.domain_weights is not None:
            log.info("loss weight of a target, by domain (train.domain_balance=%g): %s",
                     cfg.train.domain_balance, ", ".join(
                         f"{token}: {w:.3g}" for token, w in
                         zip(self.data.domain_tokens, self.step.domain_weights.tolist())))
        metric = cfg.eval.metric
        while self.epoch < cfg.train.epochs and self.bad_epochs < cfg.train.patience:
            order = np.random.default_rng([cfg.train.seed, self.epoch]).permutation(len(self.data.train))
            self.model.train()
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch,
                       desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}", leave=False,
                       mininterval=1.0, disable=None if self.comm.main else True)
            t_start = time.perf_counter()
            for batch in self._epoch_batches(order):
                self.train_step(batch)
                self.step_in_epoch += 1
                self.global_step += 1
                bar.update(1)
                if len(self.pending) >= cfg.weighting.log_every:
                    last = self._flush()
                    bar.set_postfix(loss=f"{last['train_loss']:.3f}", cd=f"{last['cd_mass']:.3f}",
                                    lam=f"{last['lambda']:+.3f}")
                if cfg.train.checkpoint_every and self.global_step % cfg.train.checkpoint_every == 0:
                    self._flush()
                    self.epoch_sums["seconds"] += time.perf_counter() - t_start
                    t_start = time.perf_counter()
                    self.save("last.pt")
            bar.close()
            self._flush()
            self.epoch_sums["seconds"] += time.perf_counter() - t_start
            valid = self.evaluate(self.data.valid, "valid")
            sums, n = self.epoch_sums, max(1, self.epoch_sums["n"])
            entry = {"epoch": self.epoch + 1,
                     **{name: sums[name] / n for name in ("train_loss", "cd_mass", "lambda", "cosine")},
                     "seconds": sums["seconds"], "steps": sums["n"],
                     "seconds_per_step": sums["seconds"] / n,
                     "valid": {metric: valid["overall"][metric]},
                     "fallbacks": int(self.step.fallbacks), "skipped_steps": self.skipped_steps,
                     "allreduce_bytes_per_step": self.comm.bytes / max(1, self.global_step)}
            if self.domain_names:
                for name in ("lambda", "cosine"):
                    entry[f"{name}_per_domain"] = {d: sums[f"{name}@{d}"] / n for d in self.domain_names}
            self.history.append(entry)
            log.info("%s", self._epoch_line(entry, metric))
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_sums = self._zero_sums()
            if valid["overall"][metric] > self.best_metric:
                self.best_metric, self.best_epoch, self.bad_epochs = valid["overall"][metric], self.epoch, 0
                self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                self.save("best.pt")
            else:
                self.bad_epochs += 1
            self.save("last.pt")
        return self.finish()

    def _epoch_line(self, entry, metric):
        """One log line per epoch, with only what the objective computes."""
        parts = [f"epoch {entry['epoch']}", f"loss {entry['train_loss']:.4f}",
                 f"L_cd {entry['cd_mass']:.4f}"]
        if self.step.mode in ("pareto", "mgda", "fixed"):
            parts.append(f"lambda {entry['lambda']:+.4f}")
        if self.step.mode in ("pareto", "mgda"):
            parts.append(f"cos {entry['cosine']:+.3f}")
        for d in self.domain_names:
            parts.append(f"domain {d}: lambda {entry['lambda_per_domain'][d]:+.3f} "
                         f"cos {entry['cosine_per_domain'][d]:+.3f}")
        parts.append(f"{entry['seconds']:.1f}s ({1000 * entry['seconds_per_step']:.1f} ms/step)")
        parts.append(f"valid {metric} {entry['valid'][metric]:.4f}")
        return " | ".join(parts)

    def finish(self):
        """Evaluate the best checkpoint (valid, test, MostPop, the oracle) and write metrics.json.
        """
        cfg = self.cfg
        best = getattr(self, "best_weights", None)  # in memory on every rank
        if best is None:  # a resumed run whose best epoch came before the interruption
            best = load_safe(os.path.join(cfg.run_dir, "best.pt"), map_location=self.device)["model"]
        self.model.load_state_dict(best)
        valid = self.evaluate(self.data.valid, "valid")
        test = self.evaluate(self.data.test, "test")
        popular = self.evaluate(self.data.test, "mostpop",
                                popularity_scorer(self.data.popularity, self.device))
        ks = list(cfg.eval.ks)
        tables = [("valid", valid), ("test", test), ("test, MostPop baseline", popular)]
        oracle = None
        if self.oracle is not None:
            # a BERT4Rec [MASK] that keeps the target's domain tells the model that domain
            knows = cfg.model.arch == "bert4rec" and cfg.data.mask_domain == "target"
            table = oracle_table(self.data, self.data.test, self.oracle, "test", knows)
            oracle = self.evaluate(self.data.test, "oracle", table_scorer(table, self.device))
            oracle["knows_target_domain"] = knows
            tables.append(("test, the generator's oracle" +
                           (" (knows the target's domain)" if knows else ""), oracle))
        for title, result in tables:
            log.info("\n%s", format_table(f"{self.data.name} {cfg.model.arch} {cfg.objective} | {title}",
                                           cfg.eval.protocol, result, ks,
                                           cfg.eval.negative_draws, cfg.eval.history))
        metrics = {"protocol": cfg.eval.protocol, "negative_draws": cfg.eval.negative_draws,
                   "eval_history": cfg.eval.history,
                   "seed": cfg.train.seed,
                   "dataset": self.data.name, "arch": cfg.model.arch, "objective": cfg.objective,
                   "weighting": cfg.weighting.mode, "loss": cfg.train.loss,
                   "max_len": cfg.data.max_len, "device": str(self.device),
                   "load_seconds": self.load_seconds, "best_epoch": self.best_epoch,
                   "valid": valid, "test": test, "baseline_mostpop_test": popular,
                   "oracle_test": oracle, "world_size": self.comm.world,
                   "history": self.history}
        if self.comm.main:
            write_text_atomic(json.dumps(metrics, indent=1), os.path.join(cfg.run_dir, "metrics.json"))
        return metrics


def _current_name(column):
    """A step-stats column under its metrics.json name (a last.pt of an older version used
    short ones)."""
    base, at, domain = column.partition("@")
    old = {"loss": "train_loss", "cd": "cd_mass", "lam": "lambda", "cos": "cosine"}
    return old.get(base, base) + at + domain


def setup_logging(run_dir):
    """Log to stderr and RUN_DIR/train.log; under torchrun only rank 0 logs (others: errors)."""
    main = int(os.environ.get("RANK", "0")) == 0
    root = logging.getLogger("autocdsr")
    root.setLevel(logging.INFO if main else logging.ERROR)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler()]
    if main:
        os.makedirs(run_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(run_dir, "train.log")))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    logging.getLogger("autocdsr.data.dataset").setLevel(logging.WARNING)


def train(cfg, resume_state=None, data=None):
    """Train a run from its config (resuming from a last.pt state if given); returns metrics.json's
    content."""
    setup_logging(cfg.run_dir)
    trainer = Trainer(cfg, data)
    clean = False
    try:
        if resume_state is not None:
            trainer.load_state(resume_state)
            log.info("resumed at epoch %d, step %d", trainer.epoch + 1, trainer.step_in_epoch)
        metrics = trainer.fit()
        clean = True
        return metrics
    finally:
        trainer.comm.close(clean)

"""analyze / compare / recommend / export end to end on tiny runs."""
import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from autocdsr.compare import CompareError, compare
from autocdsr.config import load_config
from autocdsr.data.batches import eval_batch
from autocdsr.evaluate import model_scorer
from autocdsr.serve import full_histories, load_for_serving
from autocdsr.train import train

TINY = ["data.synthetic_users=80", "data.max_len=12", "model.hidden=32", "train.batch_size=16",
        "eval.protocol=uni100_vocab", "train.warmup_steps=2", "train.epochs=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for objective in ("base", "autocdsr"):
        for seed in (0, 1):
            run_dir = root / f"{objective}{seed}"
            train(load_config(None, TINY + [f"objective={objective}", f"train.seed={seed}",
                                            f"run_dir={run_dir}"]))
            dirs[objective, seed] = run_dir
    return dirs


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "autocdsr", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_analyze_writes_figures_and_pair_mass(runs):
    proc = _cli("analyze", runs["base", 0], "--against", runs["autocdsr", 0], "--max-rows", 32)
    assert proc.returncode == 0, proc.stderr
    out = runs["base", 0] / "analysis"
    for name in ("pair_mass.json", "pair_mass.png", "trajectory.png"):
        assert (out / name).stat().st_size > 0
    result = json.loads((out / "pair_mass.json").read_text())
    for which in ("init", "trained"):
        assert result[which]["labels"] == ["0", "1", "2"]
        for layer in result[which]["layers"]:  # every query's attention sums to 1 over keys
            assert np.allclose(np.sum(layer, axis=1), 1.0, atol=1e-5)
    assert str(runs["autocdsr", 0]) in result["against"]


def test_compare_table_with_paired_test(runs, tmp_path):
    text, rows = compare([str(d) for d in runs.values()], out=str(tmp_path))
    assert "uni100_vocab" in text and len(rows) == 2
    autocdsr = next(r for r in rows if "autocdsr" in r["group"])
    cell = autocdsr["cells"][0]
    assert "diff" in cell and "p" in cell and autocdsr["seeds"] == [0, 1]
    assert (tmp_path / "compare.csv").read_text().startswith("group,seeds,column")


def test_compare_tells_the_gram_sets_apart(runs, tmp_path):
    """A run that differs from the official step only in weighting.shared gets its own group
    (labelled by it), and the official step's label stays as it was."""
    last = tmp_path / "last"
    train(load_config(None, TINY + ["objective=autocdsr", "weighting.shared=last_layer",
                                    f"run_dir={last}"]))
    _, rows = compare([str(runs["base", 0]), str(runs["autocdsr", 0]), str(last)])
    groups = sorted(r["group"] for r in rows)
    assert len(groups) == 3 and sum("shared=last_layer" in g for g in groups) == 1
    assert not any("shared=reached" in g for g in groups)


def test_compare_tells_the_negative_sampling_apart(runs, tmp_path):
    """Base runs trained with other negatives (train.negatives) form their own group, labelled
    by it; the plain base stays the baseline and its label stays as it was."""
    mixed = []
    for seed in (0, 1):
        mixed.append(tmp_path / f"mixed{seed}")
        train(load_config(None, TINY + ["train.loss=sampled", "train.num_negatives=20",
                                        "train.negatives=mixed", f"train.seed={seed}",
                                        f"run_dir={mixed[-1]}"]))
    _, rows = compare([str(runs["base", 0]), str(runs["base", 1])] + [str(m) for m in mixed])
    assert [r["group"] for r in rows] == ["arch=sasrec, objective=base",
                                          "arch=sasrec, objective=base, negatives=mixed"]
    assert "p" in rows[1]["cells"][0] and "p" not in rows[0]["cells"][0]


def test_compare_refuses_mixed_protocols(runs, tmp_path):
    other = tmp_path / "full"
    train(load_config(None, TINY + ["eval.protocol=full", f"run_dir={other}"]))
    with pytest.raises(CompareError, match="eval.protocol"):
        compare([str(runs["base", 0]), str(other)])


def test_compare_pairs_a_base_with_itself_read_from_target_domain_histories(runs, tmp_path):
    """eval.history=target_domain re-scorings of the base runs form their own group, paired by
    seed with the plain base, which stays the baseline."""
    from autocdsr.reevaluate import reevaluate
    trained = json.loads((runs["base", 0] / "metrics.json").read_text())
    assert trained["eval_history"] == "all" and isinstance(trained["history"], list)  # per epoch
    own = []
    for seed in (0, 1):
        out = tmp_path / f"own{seed}"
        metrics = reevaluate(str(runs["base", seed] / "best.pt"), ["eval.history=target_domain"],
                             out_dir=str(out), log=lambda *_: None)
        assert metrics["eval_history"] == "target_domain"
        own.append((out, metrics["test"]["overall"]["HR@10"]))
    text, rows = compare([str(runs["base", 0]), str(runs["base", 1])] + [str(o) for o, _ in own])
    assert [r["group"] for r in rows] == ["arch=sasrec, objective=base",
                                          "arch=sasrec, objective=base, history=target_domain"]
    cell = rows[1]["cells"][0]
    assert cell["mean"] == pytest.approx(np.mean([hr for _, hr in own])) and "p" in cell


def test_recommend_excludes_history_and_writes_k_per_user(runs, tmp_path):
    out = tmp_path / "recs.tsv"
    proc = _cli("recommend", "--checkpoint", runs["base", 0] / "best.pt", "--k", 5, "--out", out)
    assert proc.returncode == 0, proc.stderr
    with open(out) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(rows[0]) == ["user_id", "item_id", "rank", "score"]
    _, data, _ = load_for_serving(str(runs["base", 0] / "best.pt"))
    seqs = full_histories(data)
    history = {u: {data.item_tokens[i - 1] for i in seqs.row(r)[0]} for r, u in enumerate(seqs.users)}
    per_user = {}
    for row in rows:
        assert row["item_id"] not in history[row["user_id"]]
        per_user.setdefault(row["user_id"], []).append(float(row["score"]))
    assert len(per_user) == len(seqs.users)
    assert all(len(s) == 5 and s == sorted(s, reverse=True) for s in per_user.values())
    proc = _cli("recommend", "--checkpoint", runs["base", 0] / "best.pt", "--k", 3, "--out",
                out, "--domain", 1)
    with open(out) as f:
        items = [r["item_id"] for r in csv.DictReader(f, delimiter="\t")]
    assert proc.returncode == 0 and all(i.startswith("d1_") for i in items)


def _assert_export_reproduces_scores(checkpoint, out):
    assert _cli("export", "--checkpoint", checkpoint, "--out", out).returncode == 0
    users, items = np.load(out / "users.npy"), np.load(out / "items.npy")
    cfg, data, model = load_for_serving(checkpoint)
    seqs = full_histories(data)
    seqs.targets = np.ones(len(seqs), dtype=np.int64)
    seqs.target_domains = seqs.domains[seqs.offsets[1:] - 1]
    rows = np.arange(10)
    batch = eval_batch(seqs, rows, cfg.data.max_len, "sasrec", model.tokens)
    with torch.no_grad():
        scores = model_scorer(model)(batch, None)[:, 1:].numpy()
    assert np.allclose(users[rows] @ items.T, scores, atol=1e-4)
    return users, model


def test_exported_states_reproduce_the_model_scores(runs, tmp_path):
    _assert_export_reproduces_scores(str(runs["autocdsr", 1] / "best.pt"), tmp_path)


def test_exported_vectors_with_an_item_bias_reproduce_the_model_scores(tmp_path):
    """[h, 1] . [e, b]: the bias rides in a last column, retrieval stays one dot product."""
    train(load_config(None, TINY + ["model.item_bias=log_count", "train.epochs=1",
                                    f"run_dir={tmp_path}"]))
    users, model = _assert_export_reproduces_scores(str(tmp_path / "best.pt"), tmp_path / "x")
    assert model.item_biases() is not None and users.shape[1] == model.item_weights().shape[1] + 1


def test_single_domain_run_and_outcome_strata(runs, tmp_path):
    single = tmp_path / "single"
    metrics = train(load_config(None, TINY + ["data.domains=[0]", f"run_dir={single}"]))
    assert set(metrics["test"]["per_domain"]) == {"0"}
    cross = tmp_path / "cross"
    metrics = train(load_config(None, TINY + ["data.target_domains=[0]", f"run_dir={cross}"]))
    assert set(metrics["test"]["per_domain"]) == {"0"}  # other targets are not evaluated
    proc = _cli("analyze", cross, "--single", single, "--max-rows", 16)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((cross / "analysis" / "strata.json").read_text())
    run = result["runs"][str(cross)]
    assert sum(run["count"]) == run["users"] > 0
    assert (cross / "analysis" / "strata.png").stat().st_size > 0
    bad = _cli("train", "data.domains=[7]", f"run_dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "no event has one of these domains" in bad.stderr


def test_transfer_table_pairs_single_and_cross_domain_runs_on_the_same_targets(runs, tmp_path):
    from autocdsr.compare import transfer_table
    single = {}
    for seed in (0, 1):
        run_dir = tmp_path / f"single{seed}"
        train(load_config(None, TINY + ["data.domains=[0]", "data.shared_targets=true",
                                        f"train.seed={seed}", f"run_dir={run_dir}"]))
        single.setdefault(0, []).append(str(run_dir))
    cross = [str(runs["base", s]) for s in (0, 1)]
    text, rows = transfer_table(cross, single)
    cross_metrics = [json.loads((runs["base", s] / "metrics.json").read_text()) for s in (0, 1)]
    single_metrics = [json.loads((tmp_path / f"single{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert cross_metrics[0]["test"]["per_domain"]["0"]["count"] == \
        single_metrics[0]["test"]["overall"]["count"]  # the same targets
    single_row, cross_row = rows[0]["rows"]
    want = np.mean([m["test"]["per_domain"]["0"]["HR@10"] - s["test"]["overall"]["HR@10"]
                    for m, s in zip(cross_metrics, single_metrics)])
    assert cross_row["cells"][0]["diff"] == pytest.approx(want)
    assert "| 0 |" in text and "single HR@10" in text
    proc = _cli("transfer", *cross, "--single", *(f"0={d}" for d in single[0]),
                "--out", tmp_path / "tr")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == text
    assert (tmp_path / "tr" / "transfer.md").read_text().strip() == text
    repeated = _cli("transfer", *cross, *(a for d in single[0] for a in ("--single", f"0={d}")))
    assert repeated.returncode == 0 and repeated.stdout.strip() == text  # every seed, not the last
    with pytest.raises(CompareError, match="one seed"):  # pairing is by seed
        transfer_table(cross + cross[:1], single)
    with pytest.raises(CompareError, match="one seed"):
        transfer_table(cross, {0: single[0] + single[0][:1]})
    bad = _cli("transfer", *cross, "--single", single[0][0])
    assert bad.returncode == 2 and "expected DOMAIN=RUN_DIR" in bad.stderr
    other = tmp_path / "other_protocol"
    train(load_config(None, TINY + ["data.domains=[0]", "data.shared_targets=true",
                                    "eval.protocol=full", f"run_dir={other}"]))
    with pytest.raises(CompareError, match="protocol"):
        transfer_table(cross, {0: [str(other)]})
    redrawn = tmp_path / "redrawn"  # the same protocol averaged over other negative draws
    shutil.copytree(single[0][0], redrawn)
    metrics = json.loads((redrawn / "metrics.json").read_text())
    (redrawn / "metrics.json").write_text(json.dumps({**metrics, "negative_draws": 10}))
    with pytest.raises(CompareError, match="negative draws"):
        transfer_table(cross, {0: [str(redrawn)]})

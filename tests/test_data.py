"""The .inter reader, splits, batching."""
import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autocdsr.data.batches import bert4rec_train_batch, eval_batch, sasrec_train_batch
from autocdsr.data.dataset import (Sequences, build_leave_one_out, load_dataset, training_windows,
                                    with_domain_views)
from autocdsr.data.reader import DataError, read_inter
from autocdsr.data.synthetic import generate
from autocdsr.models.tokens import TokenSpec
from kernels import WILDCARD_DOMAIN

HEADER = "user_id:token\titem_id:token\tdomain:token\ttimestamp:float\n"


def write(path, text, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        f.write(text)
    return str(path)


def test_reads_plain_and_gzip(tmp_path):
    body = HEADER + "u1\ti1\t9\t0\nu1\ti2\t4\t1\n"
    for gz in (False, True):
        path = write(tmp_path / ("a.inter" + (".gz" if gz else "")), body, gz)
        data = read_inter(path)
        assert data["item"].to_pylist() == ["i1", "i2"]
        assert data["domain"].tolist() == [9, 4]


@pytest.mark.parametrize("body,message", [
    ("", "empty file"),
    ("user_id:token\titem_id:token\tdomain:token\n", "lacks the field 'timestamp:float'"),
    ("user_id:token\titem_id:token\tdomain:float\ttimestamp:float\n", "field 'domain' has type 'float'"),
    ("user_id\titem_id:token\tdomain:token\ttimestamp:float\n", "has no type"),
    (HEADER, "no interactions"),
    (HEADER + "u1\ti1\t9\t0\nu1\ti2\t4\n", "line 3: wrong number of columns"),
    (HEADER + "u1\ti1\t9\t0\nu1\ti2\tx\t1\n", "line 3: domain 'x' is not an integer"),
    (HEADER + "u1\ti1\t9\tsoon\n", "line 2"),
])
def test_malformed_files_name_file_and_line(tmp_path, body, message):
    path = write(tmp_path / "bad.inter", body)
    with pytest.raises(DataError, match=message) as err:
        read_inter(path)
    assert "bad.inter" in str(err.value)


def _frame(tmp_path, rows):
    body = HEADER + "".join(f"{u}\t{i}\t{d}\t{t}\n" for u, i, d, t in rows)
    return read_inter(write(tmp_path / "x.inter", body))


def test_stable_sort_and_leave_one_out_has_no_leakage(tmp_path):
    # ties at t=1 keep file order (b before c); user u2 has 2 events and is dropped
    rows = [("u1", "a", 1, 0), ("u1", "b", 1, 1), ("u1", "c", 2, 1), ("u1", "d", 1, 2),
            ("u2", "a", 1, 0), ("u2", "b", 1, 1), ("u1", "e", 2, 3)]
    data = build_leave_one_out(_frame(tmp_path, rows), "t")
    assert data.dropped_users == 1 and len(data.train) == 1
    token = lambda ids: [data.item_tokens[i - 1] for i in ids]
    assert token(data.train.row(0)[0]) == ["a", "b", "c"]
    assert token(data.valid.row(0)[0]) == ["a", "b", "c"] and token([data.valid.targets[0]]) == ["d"]
    assert token(data.test.row(0)[0]) == ["a", "b", "c", "d"] and token([data.test.targets[0]]) == ["e"]
    # the test target never appears in that user's training sequence or validation history
    assert data.test.targets[0] not in data.train.row(0)[0]
    assert data.test.targets[0] not in data.valid.row(0)[0]


def test_synthetic_loo_no_leakage():
    data = build_leave_one_out(generate(200, seed=1), "synthetic")
    for r in range(len(data.test)):
        train_len = len(data.train.row(r)[0])
        assert len(data.test.row(r)[0]) == train_len + 1   # history = train + the valid target
        assert data.test.row(r)[0][-1] == data.valid.targets[r]


def test_predefined_split_files(tmp_path):
    for part, users in (("train", ["u1", "u2"]), ("valid", ["u3"]), ("test", ["u4"])):
        rows = "".join(f"{u}\ti{k}\t{k % 2}\t{k}\n" for u in users for k in range(4))
        write(tmp_path / f"demo.{part}.inter", HEADER + rows)
    data = load_dataset(str(tmp_path), "demo", "files")
    assert len(data.train) == 2 and len(data.valid) == 1 and len(data.test) == 1
    assert len(data.test.row(0)[0]) == 3
    with pytest.raises(DataError, match="missing other.train.inter"):
        load_dataset(str(tmp_path), "other", "files")


def test_batches_truncate_to_most_recent_and_pad_right():
    data = build_leave_one_out(generate(20, min_len=30, max_len=30, seed=0), "s")
    items, _ = data.train.row(0)
    batch = sasrec_train_batch(data.train, [0], 10)
    assert batch["items"][0].tolist() == items[-11:-1].tolist()
    assert batch["targets"][0].tolist() == items[-10:].tolist()
    rng = np.random.default_rng(0)
    for hide in (False, True):
        rng = np.random.default_rng(0)
        tokens = TokenSpec.for_run(data.num_items, data.num_domains,
                                   "hidden" if hide else "target")
        cloze = bert4rec_train_batch(data.train, [0, 1], 10, tokens, 0.15, rng)
        masked = cloze["items"] == tokens.mask_item
        assert masked.any(dim=1).all()                         # at least one mask per row
        assert (cloze["targets"][masked] != 0).all() and (cloze["targets"][~masked] == 0).all()
        truth = np.stack([data.train.row(r)[1][-10:] for r in (0, 1)])
        if hide:   # a hidden-domain [MASK] is a wildcard, never a domain of its own
            assert (cloze["domains"][masked] == WILDCARD_DOMAIN).all()
        else:      # a [MASK] keeps the masked item's domain
            assert (cloze["domains"].numpy() == truth).all()
        assert (cloze["domains"][~masked].numpy() == truth[~masked.numpy()]).all()
        ev = eval_batch(data.test, [0, 1], 10, "bert4rec", tokens)
        assert (ev["items"][:, -1] == tokens.mask_item).all() and (ev["seq_lens"] == 10).all()
        want = WILDCARD_DOMAIN if hide else data.test.target_domains[[0, 1]]
        assert (ev["domains"][:, -1].numpy() == want).all()  # the appended [MASK]'s domain


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 9), st.integers(-3, 12),
                          st.floats(-1e6, 1e6, allow_nan=False)), min_size=1, max_size=40))
def test_reader_round_trips_random_files(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("h") / "r.inter"
    body = HEADER + "".join(f"u{u}\ti{i}\t{d}\t{t!r}\n" for u, i, d, t in rows)
    data = read_inter(write(path, body))
    assert data["user"].to_pylist() == [f"u{u}" for u, _, _, _ in rows]
    assert data["domain"].tolist() == [d for _, _, d, _ in rows]
    assert np.allclose(data["timestamp"], [t for _, _, _, t in rows])


def test_predefined_split_rejects_a_user_in_two_files(tmp_path):
    for part, users in (("train", ["u1", "u2"]), ("valid", ["u2"]), ("test", ["u4"])):
        rows = "".join(f"{u}\ti{k}\t0\t{k}\n" for u in users for k in range(3))
        write(tmp_path / f"demo.{part}.inter", HEADER + rows)
    with pytest.raises(DataError, match="1 users appear in both the train and the valid file"):
        load_dataset(str(tmp_path), "demo", "files")


def test_training_windows_cover_every_event_once():
    data = build_leave_one_out(generate(30, min_len=10, max_len=40, seed=2), "s")
    windows = training_windows(data.train, 8)
    assert len(windows) > len(data.train)
    assert np.diff(windows.offsets).max() <= 8 and np.diff(windows.offsets).min() >= 2
    for r in range(len(data.train)):  # a user's windows, in order, are the user's events
        mine = [w for w in range(len(windows)) if windows.users[w] == data.train.users[r]]
        joined = np.concatenate([windows.row(w)[0] for w in mine])
        full = data.train.row(r)[0]
        assert np.array_equal(joined, full[len(full) - len(joined):])
        assert len(full) - len(joined) <= 1   # only a 1-event head can be left out


def test_the_data_layer_imports_nothing_from_kernels():
    """Building batches needs no Triton: autocdsr.data takes its token ids from the model's
    TokenSpec instead of importing them."""
    import subprocess
    import sys
    code = ("import sys, autocdsr.data.batches, autocdsr.data.dataset, autocdsr.data.prefetch; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kernels', 'triton')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_shared_targets_give_single_and_cross_domain_runs_the_same_test_targets(tmp_path):
    from autocdsr.build import load_data
    from autocdsr.config import load_config
    from autocdsr.data.dataset import keep_shared_targets, last_two_domains
    base = ["data.synthetic_users=200"]
    single, _ = load_data(load_config(None, base + ["data.domains=[0]", "data.shared_targets=true"]))
    cross, _ = load_data(load_config(None, base + ["data.target_domains=[0]"]))
    single_tokens = lambda d, s: sorted(zip(s.users.tolist(), d.item_tokens[s.targets - 1].tolist()))
    assert single_tokens(single, single.test) == single_tokens(cross, cross.test)
    assert len(single.test) > 10 and set(single.test.target_domains) == {0}
    # valid: the single run's valid target is the all-domain one only where the last two are kept
    assert set(single_tokens(single, single.valid)) <= set(single_tokens(cross, cross.valid))
    # the same on a file, with a tie in timestamps kept in file order
    body = HEADER + "".join(f"u1\ti{k}\t{d}\t{t}\n" for k, (d, t) in
                            enumerate([(0, 0), (1, 1), (0, 2), (0, 2), (1, 3)])) \
        + "".join(f"u2\tj{k}\t{d}\t{k}\n" for k, d in enumerate([1, 0, 0, 0]))
    path = write(tmp_path / "x.inter", body)
    assert last_two_domains(read_inter(path)) == {"u1": (0, 1), "u2": (0, 0)}
    data = load_dataset(path, domains=[0], shared_targets=True)
    assert data.test.users.tolist() == ["u2"] and data.valid.users.tolist() == ["u2"]
    with pytest.raises(DataError, match="no valid target"):
        keep_shared_targets(load_dataset(path, domains=[0]), {"u1": (0, 1), "u2": (0, 1)}, [0])


def test_shared_targets_with_predefined_split_files(tmp_path):
    """With split files a valid or test user's target is the user's last event: a
    single-domain run keeps exactly the users whose last event is of a kept domain, with the
    same target item as the cross-domain run."""
    from autocdsr.config import ConfigError, load_config
    events = {"train": {"u1": [0, 1, 0, 1], "u2": [1, 1, 0, 0]},
              "valid": {"u3": [0, 0, 1, 0], "u4": [0, 0, 0, 1]},
              "test": {"u5": [1, 0, 1, 0], "u6": [0, 0, 1, 1], "u7": [1, 1, 1, 0]}}
    for part, users in events.items():
        rows = "".join(f"{u}\t{u}i{k}\t{d}\t{k}\n" for u, ds in users.items()
                       for k, d in enumerate(ds))
        write(tmp_path / f"demo.{part}.inter", HEADER + rows)
    single = load_dataset(str(tmp_path), "demo", "files", domains=[0], shared_targets=True)
    cross = load_dataset(str(tmp_path), "demo", "files")
    targets = lambda d, s: {u: d.item_tokens[t - 1] for u, t in zip(s.users.tolist(), s.targets)}
    # u4's last event is domain 1; u3's second-to-last is too, which leave-one-out would refuse
    assert targets(single, single.valid) == {"u3": "u3i3"}
    assert targets(single, single.test) == {"u5": "u5i3"}    # u7 has one domain-0 event: dropped
    assert targets(single, single.test).items() <= targets(cross, cross.test).items()
    assert set(single.test.domains.tolist()) == {0}          # histories hold domain 0 only
    unfiltered = load_dataset(str(tmp_path), "demo", "files", domains=[0])
    assert "u6" in unfiltered.test.users.tolist()            # without it u6 scores a domain-0 event
    with pytest.raises(ConfigError, match="needs data.domains"):
        load_config(None, ["data.shared_targets=true"])


def test_negative_mode_hints_are_exact_in_training_and_random_at_evaluation():
    from autocdsr.data.synthetic_negative import generate_negative
    frame = generate_negative(300, seed=4)
    users = np.asarray(frame["user"].to_pylist())
    items = np.asarray(frame["item"].to_pylist())
    exact = at_eval = agree_at_eval = 0
    for user in np.unique(users):
        seq, dom = items[users == user], frame["domain"][users == user]
        hurt = np.flatnonzero(dom == 3)
        for t in np.flatnonzero(dom == 2):
            later = hurt[hurt >= t + 2]
            if not len(later):
                continue
            named = seq[t][1:].split("_")[0]
            slot = seq[later[0]].split("_")[-1]
            if later[0] <= len(seq) - 3:  # a training target: the hint is its exact slot
                assert named == slot
                exact += 1
            else:
                at_eval += 1
                agree_at_eval += named == slot
    assert exact > 1000 and at_eval > 50
    assert agree_at_eval / at_eval < 0.2  # random there: 1 in 16 agree by chance
    assert set(np.unique(frame["domain"])) == {0, 1, 2, 3}


def test_domain_views_follow_the_sequences_one_per_domain_they_mix():
    # rows: two domains interleaved; one domain only; two domains of one event each
    items = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9])
    domains = np.array([0, 1, 0, 1, 0, 2, 2, 0, 1])
    seqs = Sequences(np.array([0, 5, 7, 9]), items, domains, users=np.array([10, 11, 12]))
    views = with_domain_views(seqs)
    rows = [views.row(r) for r in range(len(views))]
    assert len(views) == 5
    for r in range(3):  # the sequences themselves, unchanged, first
        assert (rows[r][0] == seqs.row(r)[0]).all() and (rows[r][1] == seqs.row(r)[1]).all()
    assert rows[3][0].tolist() == [1, 3, 5] and rows[3][1].tolist() == [0, 0, 0]
    assert rows[4][0].tolist() == [2, 4] and rows[4][1].tolist() == [1, 1]
    assert views.users.tolist() == [10, 11, 12, 10, 10]

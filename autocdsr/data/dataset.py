"""From interactions to model-ready sequences: dense vocabularies, stable (user, timestamp)
order, leave-one-out or predefined-file splits, per-domain item pools and popularity."""
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .reader import DataError, read_inter

log = logging.getLogger(__name__)

PAD = 0  # item id 0 is padding; items are 1..num_items; num_items + 1 is [MASK]


@dataclass
class Sequences:
    """Variable-length sequences in CSR form: row r is items[offsets[r]:offsets[r+1]]."""
    offsets: np.ndarray
    items: np.ndarray
    domains: np.ndarray
    targets: np.ndarray = None         # next-item targets for evaluation rows (else None)
    target_domains: np.ndarray = None
    users: np.ndarray = None           # original user token of each row

    def __len__(self):
        return len(self.offsets) - 1

    def row(self, r):
        """(items, domains) of row r."""
        lo, hi = self.offsets[r], self.offsets[r + 1]
        return self.items[lo:hi], self.domains[lo:hi]


@dataclass
class SequenceData:
    """A dataset: token maps, the train / valid / test sequences, popularity and per-domain item
    pools."""
    name: str
    item_tokens: np.ndarray     # dense item id - 1 -> original token
    domain_tokens: np.ndarray   # dense domain id -> original token (int)
    train: Sequences
    valid: Sequences
    test: Sequences
    popularity: np.ndarray      # [num_items + 2] training counts (for the MostPop baseline)
    domain_items: list          # per dense domain: sorted item ids seen in that domain
    dropped_users: int = 0

    @property
    def num_items(self):
        return len(self.item_tokens)

    @property
    def num_domains(self):
        return len(self.domain_tokens)

    def training_domain_counts(self):
        """[num_domains] int64: each domain's events in the training sequences."""
        return np.bincount(self.train.domains, minlength=self.num_domains)

    def summary(self):
        """One line describing the dataset's size."""
        return (f"{self.name}: {self.num_items} items, {self.num_domains} domains "
                f"({', '.join(str(t) for t in self.domain_tokens)}), {len(self.train)} train "
                f"sequences ({len(self.train.items)} events), {len(self.valid)} valid / "
                f"{len(self.test)} test targets, {self.dropped_users} users dropped "
                f"(too few events)")


def _csr_by_user(user_codes, order):
    """Offsets of each user's run in `order` (events sorted by user)."""
    sorted_users = user_codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    return np.r_[starts, len(order)]


def _encode(frames):
    """Dense codes for users (per frame), items and domains across all frames."""
    items = pa.chunked_array([c for f in frames for c in f["item"].chunks]).dictionary_encode()
    item_codes = np.concatenate([c.indices.to_numpy() for c in items.chunks]).astype(np.int64) + 1
    item_tokens = np.asarray(items.chunks[0].dictionary.to_pylist() if items.num_chunks else [],
                             dtype=object)
    domains = np.concatenate([f["domain"] for f in frames])
    domain_tokens, domain_codes = np.unique(domains, return_inverse=True)
    return item_codes, item_tokens, domain_codes.astype(np.int64), domain_tokens


def _user_codes(frame):
    """Dense user codes per event and the user tokens they index."""
    users = frame["user"].dictionary_encode()
    codes = np.concatenate([c.indices.to_numpy() for c in users.chunks]).astype(np.int64)
    tokens = np.asarray(users.chunks[0].dictionary.to_pylist() if users.num_chunks else [],
                        dtype=object)
    return codes, tokens


def _sequences(users, timestamps, items, domains, min_events):
    """Group events by user in (user, timestamp) order, stable for ties. Returns the CSR
    sequences of users with >= min_events events and the number of users dropped.
    users = (codes per event, tokens)."""
    user_codes, user_tokens = users
    order = np.lexsort((timestamps, user_codes))  # lexsort is stable: ties keep file order
    offsets = _csr_by_user(user_codes, order)
    lengths = np.diff(offsets)
    keep = lengths >= min_events
    kept_rows = np.flatnonzero(keep)
    idx = np.concatenate([order[offsets[r]:offsets[r + 1]] for r in kept_rows]) \
        if len(kept_rows) else np.zeros(0, np.int64)
    new_offsets = np.r_[0, np.cumsum(lengths[keep])]
    row_users = user_tokens[user_codes[order[offsets[:-1][keep]]]] if len(kept_rows) else \
        np.zeros(0, dtype=object)
    return Sequences(new_offsets, items[idx], domains[idx], users=row_users), int((~keep).sum())


def _truncate_tail(seqs, drop):
    """Sequences without their last `drop` events (the training part of leave-one-out)."""
    lengths = np.diff(seqs.offsets) - drop
    keep_idx = np.concatenate([np.arange(lo, lo + n) for lo, n in zip(seqs.offsets[:-1], lengths)]) \
        if len(lengths) else np.zeros(0, np.int64)
    return Sequences(np.r_[0, np.cumsum(lengths)], seqs.items[keep_idx], seqs.domains[keep_idx],
                     users=seqs.users)


def _split_last(seqs):
    """Evaluation rows: history = every event but the last, target = the last event."""
    history = _truncate_tail(seqs, 1)
    last = seqs.offsets[1:] - 1
    history.targets, history.target_domains = seqs.items[last], seqs.domains[last]
    return history


def _finish(name, item_tokens, domain_tokens, train, valid, test, dropped):
    num_items = len(item_tokens)
    popularity = np.bincount(train.items, minlength=num_items + 2).astype(np.float64)
    all_items = np.concatenate([train.items, valid.items, valid.targets, test.items, test.targets])
    all_domains = np.concatenate([train.domains, valid.domains, valid.target_domains,
                                  test.domains, test.target_domains])
    domain_items = [np.unique(all_items[all_domains == d]) for d in range(len(domain_tokens))]
    data = SequenceData(name, item_tokens, domain_tokens, train, valid, test, popularity,
                        domain_items, dropped)
    log.info(data.summary())
    return data


def build_leave_one_out(frame, name="data"):
    """Train on all but the last two events, validate on the second-to-last, test on the last.
    Users with fewer than 3 events are dropped (counted)."""
    item_codes, item_tokens, domain_codes, domain_tokens = _encode([frame])
    seqs, dropped = _sequences(_user_codes(frame), frame["timestamp"], item_codes, domain_codes,
                               min_events=3)
    if len(seqs) == 0:
        raise DataError(f"{name}: no user has the 3 events leave-one-out needs")
    train = _truncate_tail(seqs, 2)
    valid = _split_last(_truncate_tail(seqs, 1))
    test = _split_last(seqs)
    return _finish(name, item_tokens, domain_tokens, train, valid, test, dropped)


def _check_users_disjoint(frames, name):
    """The predefined split is by user: a user in two files would leak targets into training."""
    labels = ("train", "valid", "test")
    seen = {}
    for label, frame in zip(labels, frames):
        users = set(frame["user"].unique().to_pylist())
        for other, other_users in seen.items():
            shared = users & other_users
            if shared:
                example = sorted(shared)[0]
                raise DataError(f"{name}: {len(shared)} users appear in both the {other} and the "
                                f"{label} file (e.g. '{example}'); the predefined split must be "
                                f"by user (use data.split=loo for one file per user history)")
        seen[label] = users


def build_predefined(frames, name="data"):
    """frames = (train, valid, test) as read; split by user as in the KuaiRand files."""
    _check_users_disjoint(frames, name)
    item_codes, item_tokens, domain_codes, domain_tokens = _encode(frames)
    bounds = np.cumsum([0] + [len(f["domain"]) for f in frames])
    parts, dropped = [], 0
    for k, frame in enumerate(frames):
        sl = slice(bounds[k], bounds[k + 1])
        seqs, n_drop = _sequences(_user_codes(frame), frame["timestamp"], item_codes[sl],
                                  domain_codes[sl], min_events=2)
        dropped += n_drop
        parts.append(seqs)
    train, valid, test = parts[0], _split_last(parts[1]), _split_last(parts[2])
    for label, part in (("train", train), ("valid", valid), ("test", test)):
        if len(part) == 0:
            raise DataError(f"{name}: the {label} file has no user with at least 2 events")
    return _finish(name, item_tokens, domain_tokens, train, valid, test, dropped)


def split_files(folder, name):
    """The RecBole benchmark_filename convention: NAME.{train,valid,test}.inter[.gz]."""
    paths = []
    for part in ("train", "valid", "test"):
        candidates = [os.path.join(folder, f"{name}.{part}.inter{ext}") for ext in ("", ".gz")]
        found = [p for p in candidates if os.path.isfile(p)]
        if not found:
            raise DataError(f"{folder}: missing {name}.{part}.inter (or .gz) for data.split=files")
        paths.append(found[0])
    return paths


def keep_domains(frame, domains):
    """The frame's events whose domain token is in `domains` (None: all), in file order."""
    if not domains:
        return frame
    keep = np.isin(frame["domain"], np.asarray(list(domains), dtype=np.int64))
    if not keep.any():
        raise DataError(f"data.domains={list(domains)}: no event has one of these domains")
    mask = pa.array(keep)
    return {"user": frame["user"].filter(mask), "item": frame["item"].filter(mask),
            "domain": frame["domain"][keep], "timestamp": frame["timestamp"][keep]}


def keep_target_domains(data, domains):
    """Evaluation rows (valid and test) whose target's domain token is in `domains`."""
    if not domains:
        return data
    tokens = [int(t) for t in data.domain_tokens]
    unknown = [d for d in domains if int(d) not in tokens]
    if unknown:
        raise DataError(f"data.target_domains: {unknown} not among the data's domains {tokens}")
    wanted = np.array([tokens.index(int(d)) for d in domains])
    for label in ("valid", "test"):
        split = getattr(data, label)
        rows = np.flatnonzero(np.isin(split.target_domains, wanted))
        if not len(rows):
            raise DataError(f"data.target_domains={list(domains)}: no {label} target left")
        setattr(data, label, select_rows(split, rows))
    return data


def training_windows(seqs, window):
    """Each training sequence cut, from its end, into consecutive pieces of `window` events
    (the first piece may be shorter; pieces under 2 events are dropped), so that training sees
    every event rather than only each user's most recent `window`."""
    lengths = np.diff(seqs.offsets)
    cuts = [np.arange(hi, lo, -window)[::-1] for lo, hi in zip(seqs.offsets[:-1], seqs.offsets[1:])]
    starts = np.concatenate([np.maximum(c - window, lo) for c, lo in zip(cuts, seqs.offsets[:-1])])
    ends = np.concatenate(cuts) if len(cuts) else np.zeros(0, np.int64)
    keep = ends - starts >= 2
    starts, ends = starts[keep], ends[keep]
    owner = np.repeat(np.arange(len(lengths)), [len(c) for c in cuts])[keep]
    sizes = ends - starts
    index = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(sizes.sum())
    users = None if seqs.users is None else seqs.users[owner]
    return Sequences(np.r_[0, np.cumsum(sizes)], seqs.items[index], seqs.domains[index],
                     users=users)


def with_domain_views(seqs):
    """The training sequences followed by their single-domain views: for each sequence that
    mixes domains, its events of each domain in their order (a view under 2 events is
    dropped). A small domain's events are scattered among the large domains' in the mixed
    sequences; a view shows the model that domain's own sequential patterns, as a model
    trained on the domain alone sees them (mixed plus per-domain sequences are the usual input
    of cross-domain sequential models)."""
    lengths = np.diff(seqs.offsets)
    owner = np.repeat(np.arange(len(seqs)), lengths)
    num_domains = int(seqs.domains.max()) + 1 if len(seqs.domains) else 1
    group = owner * num_domains + seqs.domains
    order = np.argsort(group, kind="stable")  # by sequence, then domain, time kept within
    sizes = np.bincount(group, minlength=len(seqs) * num_domains)
    domains_per_row = (sizes.reshape(len(seqs), num_domains) > 0).sum(1)
    keep_group = (sizes >= 2) & np.repeat(domains_per_row >= 2, num_domains)
    order = order[keep_group[group[order]]]
    offsets = np.r_[seqs.offsets, seqs.offsets[-1] + np.cumsum(sizes[keep_group])]
    views_per_row = keep_group.reshape(len(seqs), num_domains).sum(1)
    users = None if seqs.users is None else np.r_[seqs.users,
                                                   np.repeat(seqs.users, views_per_row)]
    return Sequences(offsets, np.r_[seqs.items, seqs.items[order]],
                     np.r_[seqs.domains, seqs.domains[order]], users=users)


def select_rows(seqs, rows):
    """A new Sequences with the given rows (targets and users carried along)."""
    lengths = np.diff(seqs.offsets)[rows]
    starts = np.repeat(seqs.offsets[rows] - (np.cumsum(lengths) - lengths), lengths)
    index = starts + np.arange(lengths.sum())
    pick = lambda a: None if a is None else a[rows]
    return Sequences(np.r_[0, np.cumsum(lengths)], seqs.items[index], seqs.domains[index],
                     pick(seqs.targets), pick(seqs.target_domains), pick(seqs.users))


def target_domain_history(seqs):
    """Evaluation rows with each history cut to its events of the row's target domain (the
    eval.history=target_domain diagnostic); a history with no such event keeps its last event,
    so that every row still has a state to predict from. Targets and users are unchanged."""
    lengths = np.diff(seqs.offsets)
    owner = np.repeat(np.arange(len(seqs)), lengths)
    keep = seqs.domains == seqs.target_domains[owner]
    none_kept = (np.bincount(owner[keep], minlength=len(seqs)) == 0) & (lengths > 0)
    keep[seqs.offsets[1:][none_kept] - 1] = True
    kept = np.bincount(owner[keep], minlength=len(seqs))
    return Sequences(np.r_[0, np.cumsum(kept)], seqs.items[keep], seqs.domains[keep],
                     seqs.targets, seqs.target_domains, seqs.users)


def last_two_domains(frame):
    """{user token: (domain token of the second-to-last event, of the last)} in the order
    leave-one-out splits by ((timestamp, file order) per user); None for a 1-event user's first."""
    users = np.asarray(frame["user"].to_pylist(), dtype=object)
    order = np.lexsort((frame["timestamp"], users.astype(str)))
    domains = frame["domain"][order]
    users = users[order]
    ends = np.r_[np.flatnonzero(users[1:] != users[:-1]), len(users) - 1]
    return {users[e]: (domains[e - 1] if e > 0 and users[e - 1] == users[e] else None, domains[e])
            for e in ends}


def keep_shared_targets(data, last_two, domains, valid_is_second_to_last=True):
    """Evaluation rows of a data.domains run whose target is also the all-domain split's
    target: test rows of users whose last event is of a kept domain; valid rows likewise, except
    that under leave-one-out (valid_is_second_to_last) the valid target is the second-to-last
    event, so both last events must be kept. With predefined split files a valid user's target
    is that user's last event (`last_two` then maps the valid and the test users). A
    single-domain run filtered so and a cross-domain run with data.target_domains = the same
    domains then score the same test targets."""
    kept = {int(d) for d in domains}
    for label, needs_both in (("valid", valid_is_second_to_last), ("test", False)):
        split = getattr(data, label)
        ok = [last_two[u][1] in kept and (not needs_both or last_two[u][0] in kept)
              for u in split.users]
        rows = np.flatnonzero(ok)
        if not len(rows):
            raise DataError(f"data.shared_targets: no {label} target of domains {sorted(kept)} "
                            f"is also an all-domain target")
        setattr(data, label, select_rows(split, rows))
    return data


def load_dataset(path, name="", split="loo", domains=None, shared_targets=False):
    """Load a folder (predefined split files, or one NAME.inter for leave-one-out) or a file;
    domains: keep only these domain tokens' events (a single-domain baseline); shared_targets:
    then keep only the evaluation targets an all-domain split also has (keep_shared_targets)."""
    if os.path.isdir(path):
        name = name or os.path.basename(os.path.normpath(path))
        if split == "files":
            frames = [read_inter(p) for p in split_files(path, name)]
            data = build_predefined([keep_domains(f, domains) for f in frames], name)
            if not shared_targets:
                return data
            last_two = {**last_two_domains(frames[1]), **last_two_domains(frames[2])}
            return keep_shared_targets(data, last_two, domains, valid_is_second_to_last=False)
        candidates = [os.path.join(path, f"{name}.inter{ext}") for ext in ("", ".gz")]
        found = [p for p in candidates if os.path.isfile(p)]
        if not found:
            raise DataError(f"{path}: no {name}.inter for data.split=loo (use data.split=files "
                            f"for NAME.train/valid/test.inter files)")
        path = found[0]
    if split == "files":
        raise DataError(f"{path}: data.split=files needs a folder with NAME.{{train,valid,test}}.inter")
    frame = read_inter(path)
    data = build_leave_one_out(keep_domains(frame, domains), name or os.path.basename(path).split(".")[0])
    return keep_shared_targets(data, last_two_domains(frame), domains) if shared_targets else data

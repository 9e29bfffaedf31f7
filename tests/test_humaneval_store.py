"""The annotation database: assignment (quota per pair, nobody twice, even filling, leases,
concurrent annotators), idempotent submits, undo, restarts and the export."""
import threading
from collections import Counter

import pytest
from humaneval_data import MODEL_A, MODEL_B, english_pairs, write_judge_folder

from pdpo_jax.humaneval.pairs import load_pairs
from pdpo_jax.humaneval.store import Conflict, Forbidden, NotFound, Store, StoreError


class Clock:
    def __init__(self):
        self.t = 1_800_000_000.0

    def __call__(self):
        return self.t


@pytest.fixture
def pairs(tmp_path):
    return load_pairs(write_judge_folder(tmp_path / "judge", english_pairs(6)))


def _loads(store):
    return [p["answered"] + p["open"] for p in store.pair_progress()]


def test_pairs_fill_evenly_with_distinct_annotators(tmp_path, pairs):
    store = Store(tmp_path / "a.sqlite", pairs, per_pair=3, seed=1)
    who = [store.sign_in(name=n)[0] for n in ("ann", "bob", "cyd", "dee")]
    seen = Counter()
    for step in range(100):
        w = who[step % 4]
        a = store.current(w)
        if a is None:
            continue
        seen[(w.name, a.pair)] += 1
        loads = _loads(store)
        assert max(loads) - min(loads) <= 1, loads  # handed out evenly, one round at a time
        assert store.submit(w, a.id, 1 + step % 3) == "saved"
    assert _loads(store) == [3] * 6                       # every pair reached its quota
    assert max(seen.values()) == 1                        # nobody saw a pair twice
    assert all(a is None for a in map(store.current, who))  # and nothing is left


def test_ties_follow_the_seeded_order(tmp_path, pairs):
    orders = []
    for seed in (0, 0, 5):
        store = Store(tmp_path / f"s{seed}-{len(orders)}.sqlite", pairs, per_pair=1, seed=seed)
        w = store.sign_in(name="ann")[0]
        order = []
        while (a := store.current(w)) is not None:
            order.append(a.pair)
            store.submit(w, a.id, 3)
        orders.append(order)
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == list(range(6))


def test_quota_per_annotator_and_token_sign_in(tmp_path, pairs):
    tokens = {"ann": "token-ann-1", "bob": "token-bob-2"}
    store = Store(tmp_path / "a.sqlite", pairs, per_pair=1, annotators=tokens)
    assert store.quota == 3  # 6 pairs x 1 / 2 annotators
    with pytest.raises(Forbidden, match="unknown token"):
        store.sign_in(token="nope-nope")
    with pytest.raises(StoreError, match="signs in with a personal token"):
        store.sign_in(name="ann")
    ann, secret = store.sign_in(token="token-ann-1")
    assert ann.name == "ann" and store.annotator_for(secret) == ann
    store.sign_out(secret)
    assert store.annotator_for(secret) is None
    for _ in range(3):
        store.submit(ann, store.current(ann).id, 2)
    assert store.current(ann) is None and store.progress(ann)[:2] == (3, 3)
    with pytest.raises(StoreError, match="--per-pair 3 needs at least 3 annotators"):
        Store(tmp_path / "b.sqlite", pairs, per_pair=3, annotators=tokens)


def test_submit_is_idempotent_and_a_changed_answer_needs_undo(tmp_path, pairs):
    store = Store(tmp_path / "a.sqlite", pairs)
    ann, bob = store.sign_in(name="ann")[0], store.sign_in(name="bob")[0]
    first = store.current(ann)
    assert store.current(ann) == first  # asking again (a reload) gives the same slot
    assert store.submit(ann, first.id, 1) == "saved"
    assert store.submit(ann, first.id, 1) == "unchanged"
    with pytest.raises(Conflict, match="already answered with '1'; undo it first"):
        store.submit(ann, first.id, 3)
    with pytest.raises(NotFound):
        store.submit(bob, first.id, 1)  # not bob's
    with pytest.raises(NotFound):
        store.assignment(bob, first.id)
    second = store.current(ann)
    store.submit(ann, second.id, 2)
    with pytest.raises(Conflict, match=f"not your last answer \\(assignment {second.id}\\)"):
        store.undo(ann, first.id)
    assert store.undo(ann, second.id) == "undone"
    assert store.undo(ann, second.id) == "unchanged"
    assert store.current(ann).id == second.id  # the undone pair comes back first
    assert store.undo(ann, first.id) == "undone"  # now first is the last answer: walk back
    assert store.current(ann).id == first.id
    assert store.submit(ann, first.id, 3) == "saved"
    assert store.current(ann).id == second.id
    assert [(r["pair"], r["choice"]) for r in store.judgments()] == [(first.pair, "tie")]


def test_export_names_models_in_shown_order(tmp_path, pairs):
    store = Store(tmp_path / "a.sqlite", pairs, per_pair=1)
    ann = store.sign_in(name="ann")[0]
    for choice in (1, 2, 3, 1, 2, 3):
        store.submit(ann, store.current(ann).id, choice)
    rows = store.judgments()
    assert len(rows) == 6 and {r["annotator"] for r in rows} == {"ann"}
    for row, choice in zip(rows, (1, 2, 3, 1, 2, 3)):
        swapped = store.assignment(ann, row["assignment"]).swapped
        assert (row["shown_1"], row["shown_2"]) == ((MODEL_B, MODEL_A) if swapped else (MODEL_A, MODEL_B))
        assert row["winner"] == {1: row["shown_1"], 2: row["shown_2"], 3: "tie"}[choice]
        assert row["shown_at"] <= row["answered_at"]
    assert len({r["shown_1"] for r in rows}) == 2  # both orders occur among six pairs


def test_an_idle_slot_is_released_after_the_lease(tmp_path, pairs):
    clock = Clock()
    store = Store(tmp_path / "a.sqlite", pairs[:1], per_pair=1, lease_s=60, clock=clock)
    ann, bob = store.sign_in(name="ann")[0], store.sign_in(name="bob")[0]
    held = store.current(ann)
    assert store.current(bob) is None  # the one slot is ann's
    clock.t += 61
    taken = store.current(bob)
    assert taken is not None and taken.pair == held.pair
    assert store.current(ann) is None  # ann has seen that pair: never again
    with pytest.raises(Conflict, match="idle over 1 min and its pair went to someone else"):
        store.submit(ann, held.id, 1)
    assert store.submit(bob, taken.id, 2) == "saved"


def test_a_released_slot_still_free_accepts_the_late_answer(tmp_path, pairs):
    clock = Clock()
    store = Store(tmp_path / "a.sqlite", pairs[:1], per_pair=2, lease_s=60, clock=clock)
    ann, bob = store.sign_in(name="ann")[0], store.sign_in(name="bob")[0]
    held = store.current(ann)
    clock.t += 61
    store.current(bob)  # releases ann's slot; bob takes the other one
    assert store.submit(ann, held.id, 1) == "saved"
    assert [p["answered"] + p["open"] for p in store.pair_progress()] == [2]


def test_a_restart_keeps_everything_and_checks_the_pairs(tmp_path, pairs):
    store = Store(tmp_path / "a.sqlite", pairs, seed=3)
    ann, secret = store.sign_in(name="ann")
    store.submit(ann, store.current(ann).id, 2)
    open_one = store.current(ann)
    again = Store(tmp_path / "a.sqlite", pairs, seed=99)  # the stored seed wins
    assert again.seed == 3 and again.annotator_for(secret) == ann
    assert again.current(ann) == open_one and again.judgments() == store.judgments()
    with pytest.raises(StoreError, match="holds a study of other pairs .* or a new --db"):
        Store(tmp_path / "a.sqlite", pairs[:3])
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not an annotation database"):
        Store(tmp_path / "junk.sqlite", pairs)


def test_concurrent_annotators_never_share_a_slot(tmp_path, pairs):
    path = tmp_path / "a.sqlite"
    Store(path, pairs, per_pair=2)
    names = ["ann", "bob", "cyd", "dee"]
    errors, done = [], Counter()

    def work(name):
        store = Store(path, pairs, per_pair=2)  # its own connections, like another worker
        who = store.sign_in(name=name)[0]
        try:
            while (a := store.current(who)) is not None:
                store.submit(who, a.id, 1)
                done[name] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    rows = Store(path, pairs, per_pair=2).judgments()
    per_pair = Counter(r["pair"] for r in rows)
    assert per_pair == {p.id: 2 for p in pairs}               # every slot filled exactly once
    assert len({(r["annotator"], r["pair"]) for r in rows}) == len(rows) == 12
    assert sum(done.values()) == 12

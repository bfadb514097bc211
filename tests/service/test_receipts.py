"""hansgate.service.receipts: signed receipts (forged, other model, expired) and the bounded shared store."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hansgate.errors import RequestError
from hansgate.service.receipts import PredictionStore, Receipt, ReceiptSigner

SHA = "a" * 64
_PLAIN = re.compile(r"[0-9a-zA-Z_-]+")


def reason(fn, *args, **kw):
    with pytest.raises(RequestError) as info:
        fn(*args, **kw)
    return info.value.reason


@given(st.text(min_size=1, max_size=40), st.integers(0, 999), st.text(alphabet="+-", max_size=8))
def test_roundtrip(rid, cls, signs):
    s = ReceiptSigner(b"k" * 32, SHA, ttl_s=60)
    r = Receipt(rid, cls, SHA, signs, 1000.0)
    assert s.verify(s.sign(r), now=1001.0) == r


def test_forged_other_model_expired():
    s = ReceiptSigner(b"k" * 32, SHA, ttl_s=60)
    token = s.sign(Receipt("r1", 2, SHA, "+-", 1000.0))
    head, payload, sig = token.split(".")
    tampered = s.sign(Receipt("r1", 1, SHA, "+-", 1000.0)).split(".")[1]
    assert reason(s.verify, f"{head}.{tampered}.{sig}", now=1000) == "forged_receipt"  # class changed
    assert reason(ReceiptSigner(b"x" * 32, SHA, 60).verify, token, now=1000) == "forged_receipt"  # other key
    assert reason(s.verify, "garbage", now=1000) == "forged_receipt"
    assert reason(s.verify, f"{head}.{payload}.!!", now=1000) == "forged_receipt"
    other = ReceiptSigner(b"k" * 32, "b" * 64, 60)
    assert reason(other.verify, token, now=1000) == "wrong_model"
    assert reason(s.verify, token, now=1061) == "expired"


def test_store_lookup_claim_and_bounds(tmp_path):
    store = PredictionStore(tmp_path / "s.sqlite", max_size=5, ttl_s=100)
    store.add([(f"r{i}", i % 3, "+", 1000.0 + i) for i in range(8)])
    assert store.lookup("r7", SHA, now=1010).class_index == 1
    store.prune(now=1010)
    assert store.size() == 5
    assert reason(store.lookup, "r0", SHA, now=1010) == "unknown_request"  # evicted (oldest first)
    assert reason(store.lookup, "r7", SHA, now=1200) == "unknown_request"  # older than the TTL
    assert reason(store.lookup, "nope", SHA) == "unknown_request"
    store.claim("r7", now=1010)
    assert reason(store.claim, "r7", now=1011) == "duplicate_feedback"
    store.release("r7")
    store.claim("r7", now=1012)
    # a second connection (another worker) sees the same claims and predictions
    other = PredictionStore(tmp_path / "s.sqlite", max_size=5, ttl_s=100)
    assert reason(other.claim, "r7") == "duplicate_feedback"
    assert other.lookup("r6", SHA, now=1010).class_index == 0
    store.close()
    other.close()


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed_payload(s: ReceiptSigner, payload: dict, version: str = "v2") -> str:
    """A token over an arbitrary payload with the signer's key (what a leaked key allows); ``v1``: the
    format before this one (HMAC-SHA256, unpadded)."""
    import json

    raw = json.dumps(payload).encode()
    if version == "v1":
        head = f"v1.{_b64(raw)}"
        return f"{head}.{_b64(s._mac_v1(head.encode()))}"
    raw = raw.ljust(-(-len(raw) // 3) * 3)
    return f"v2.{_b64(raw)}.{_b64(s._mac(raw))}"


def test_receipts_issued_in_the_v1_format_still_verify_until_they_expire():
    s = ReceiptSigner(b"k" * 32, SHA, ttl_s=60, n_classes=3, n_concepts=2)
    token = _signed_payload(s, {"r": "abc-0", "c": 2, "m": SHA, "s": "+-", "t": 1000.0}, version="v1")
    assert s.verify(token, now=1001.0).class_index == 2
    assert reason(s.verify, token, now=1061.0) == "expired"
    head, payload, tag = token.split(".")
    assert reason(s.verify, f"v2.{payload}.{tag}", now=1001.0) == "forged_receipt"  # a v1 tag is no v2 tag
    v2 = s.sign(Receipt("abc-0", 2, SHA, "+-", 1000.0))
    assert reason(s.verify, "v1." + v2.split(".", 1)[1], now=1001.0) == "forged_receipt"
    assert reason(s.verify, v2[:-4], now=1001.0) == "forged_receipt"  # a shortened tag


@pytest.mark.parametrize("field, value", [
    ("c", 99), ("c", 3), ("c", -1), ("c", True), ("c", 1.5), ("c", "1"),  # class index outside [0, 3) or not an int
    ("t", float("nan")), ("t", float("inf")), ("t", 1e12), ("t", "1000"),  # NaN, infinite, far future, not a number
    ("s", "+"), ("s", "+x"), ("s", 5),  # signs: one + or - per concept
    ("r", ""), ("r", "x" * 129), ("r", 7),
])
def test_every_field_of_a_verified_receipt_is_checked(field, value):
    """Issue 13.10: class 99 gave 500, class -1 counted as the last class, a future/NaN time never expired."""
    s = ReceiptSigner(b"k" * 32, SHA, ttl_s=60, n_classes=3, n_concepts=2)
    good = {"r": "abc-0", "c": 2, "m": SHA[:16], "s": "+-", "t": 1000.0}
    assert s.verify(_signed_payload(s, good), now=1001.0).class_index == 2
    assert reason(s.verify, _signed_payload(s, good | {field: value}), now=1001.0) == "forged_receipt"


def test_sign_writes_the_same_payload_as_json_dumps():
    import base64
    import json

    s = ReceiptSigner(b"k" * 32, SHA, ttl_s=60)
    for rid, t in [('we"ird\\id', 1700000000.1234567), ("r", 5.0)]:
        token = s.sign(Receipt(rid, 1, SHA, "+-", t))
        assert "=" not in token and token.startswith("v2.") and len(token.split(".")[2]) == 40
        raw = base64.urlsafe_b64decode(token.split(".")[1])
        assert len(raw) % 3 == 0 and len(raw) - len(raw.rstrip(b" ")) <= 2  # padded with at most two spaces
        assert raw.rstrip(b" ") == json.dumps({"r": rid, "c": 1, "m": SHA[:16], "s": "+-", "t": round(t, 3)},
                                 separators=(",", ":")).encode()


@given(st.from_regex(r"[0-9a-zA-Z_-]{1,40}", fullmatch=True) | st.text(min_size=1, max_size=20),
       st.lists(st.tuples(st.integers(0, 9), st.text(alphabet="+-", min_size=2, max_size=2),
                          st.sampled_from(["", "site=A", "site=B,stroke=thin"])), min_size=1, max_size=5),
       st.floats(1e9, 2e9))
def test_sign_rows_equals_sign_per_row(rid, rows, t):
    """The batch path signs what ``sign`` signs for ids ``rid-j``: every token verifies to that receipt."""
    s = ReceiptSigner(b"k" * 32, SHA, ttl_s=60, n_classes=10, n_concepts=2)
    classes, signs, attrs = (list(c) for c in zip(*rows))
    tokens = s.sign_rows(rid, classes, signs, t, attrs if any(attrs) else None)
    expected = [Receipt(f"{rid}-{j}", c, SHA, g, round(t, 3), a if any(attrs) else "")
                for j, (c, g, a) in enumerate(rows)]
    assert [s.verify(token, now=t + 1) for token in tokens] == expected
    assert len({len(token) for token in tokens}) == 1 or not _PLAIN.fullmatch(rid)  # one padded length a request
    if len(rows) == 1:
        assert tokens == [s.sign(expected[0])]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.sampled_from([1000.0, 1001.0, 1002.0, 1050.0])), max_size=12),
       st.integers(1, 20))
def test_prune_keeps_the_newest_whole_requests_that_fit(tmp_path_factory, requests, max_size):
    """Eviction keeps whole requests among the last ``max_size`` rows stored (in insertion order, one
    transaction or several), and drops every request past the TTL: the rule written out over the rows."""
    store = PredictionStore(tmp_path_factory.mktemp("s") / "s.sqlite", max_size=max_size, ttl_s=100)
    store._PRUNE_EVERY = 10**9  # only the explicit prune below
    rows = [(f"r{i}", [1] * n, ["+"] * n, t) for i, (n, t) in enumerate(requests)]
    store.add_requests(rows[:3])
    store.add_requests(rows[3:])
    store.prune(now=1101.5)  # 1000.0 and 1001.0 are past the TTL
    expected, after = set(), 0
    for i in reversed(range(len(requests))):
        n, t = requests[i]
        after += n  # rows of this request and of every later one
        if t >= 1001.5 and after <= max_size:
            expected.add(f"r{i}")
    held = {rid for (rid,) in store._db.execute("SELECT id FROM requests")}
    assert held == expected
    assert store.size() == sum(n for i, (n, _) in enumerate(requests) if f"r{i}" in expected)
    store.close()


def test_a_prune_costs_what_it_evicts_not_what_the_store_holds(tmp_path):
    """SQLite's VM steps for a prune that evicts the same 10 requests barely grow with the rows and labels
    held: eviction reads index ranges. (It summed and walked every row: after single-row traffic had filled
    the store, each 64-row request paid for a scan of 100,000 rows.)"""
    def steps(held: int) -> int:
        store = PredictionStore(tmp_path / f"{held}.sqlite", max_size=held, ttl_s=1e9)
        store._PRUNE_EVERY = 10**9
        store.add_requests([(f"r{i}", [1], ["+"], 1000.0 + i) for i in range(held)])
        store.add_requests([(f"n{i}", [1], ["+"], 1e6) for i in range(10)])  # 10 rows over: 10 to evict
        store._db.executemany("INSERT INTO feedback VALUES (?, ?)", [(f"r{i}-0", 1e6) for i in range(held)])
        count = [0]

        def tick() -> int:
            count[0] += 1
            return 0

        store._db.set_progress_handler(tick, 1)
        store.prune(now=1e6)
        store._db.set_progress_handler(None, 1)
        assert store.size() == held
        assert store._db.execute("SELECT count(*) FROM requests WHERE id LIKE 'r%'").fetchone()[0] == held - 10
        store.close()
        return count[0]

    small, large = steps(500), steps(20_000)
    assert large < 2 * small, (small, large)


def test_a_store_written_before_rows_were_counted_is_counted_in_issue_order(tmp_path):
    """Stores from before ``rows_before`` (one column fewer) open, count their rows by issue time and prune."""
    import sqlite3

    db = sqlite3.connect(tmp_path / "s.sqlite")
    db.execute("CREATE TABLE requests (id TEXT PRIMARY KEY, classes TEXT NOT NULL, signs TEXT NOT NULL, "
               "n INTEGER NOT NULL, issued REAL NOT NULL)")
    db.executemany("INSERT INTO requests VALUES (?, ?, ?, ?, ?)",
                   [("b", "1,2", "++", 2, 1001.0), ("a", "3,4,5", "+++", 3, 1000.0), ("c", "6", "+", 1, 1002.0)])
    db.commit()
    db.close()
    store = PredictionStore(tmp_path / "s.sqlite", max_size=4, ttl_s=100)
    assert dict(store._db.execute("SELECT id, rows_before FROM requests")) == {"a": 0, "b": 3, "c": 5}
    assert store.lookup("a-2", SHA, now=1003).class_index == 5
    store.add_requests([("d", [7], ["-"], 1003.0)])  # counted after the old rows
    store.prune(now=1004)  # 7 rows > 4: "a" goes, "b", "c" and "d" hold 4
    assert {rid for (rid,) in store._db.execute("SELECT id FROM requests")} == {"b", "c", "d"}
    store.close()
    PredictionStore(tmp_path / "s.sqlite", max_size=4, ttl_s=100).close()  # opens again without counting anew


def test_request_ids_are_uuid7_in_time_order():
    """Ids grow with time (the store's id index appends at one end) and are RFC 9562 version 7 UUIDs."""
    import time
    import uuid

    from hansgate.service.receipts import new_request_id

    first = new_request_id()
    time.sleep(0.002)
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(first < i for i in ids)
    parsed = uuid.UUID(hex=first)
    assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122) and len(first) == 32
    assert abs(int(first[:12], 16) / 1000 - time.time()) < 60


def test_store_packs_a_request_into_one_row(tmp_path):
    """``add_requests``: one SQLite row per request; row ``j`` answers to ``id-j``; bounds count rows."""
    store = PredictionStore(tmp_path / "s.sqlite", max_size=5, ttl_s=100)
    store.add_requests([("a", [1, 2, 3], ["+-", "--", "++"], 1000.0), ("b", [4, 5], ["-+", "+-"], 1001.0)])
    assert store.size() == 5
    r = store.lookup("a-2", SHA, now=1002)
    assert (r.request_id, r.class_index, r.concept_signs, r.issued_at) == ("a-2", 3, "++", 1000.0)
    assert store.lookup("b-0", SHA, now=1002).concept_signs == "-+"
    for missing in ("a-3", "a-02", "a", "c-0", "a--1", "b-1x"):
        assert reason(store.lookup, missing, SHA, now=1002) == "unknown_request"
    assert reason(store.lookup, "a-0", SHA, now=1101) == "unknown_request"  # older than the TTL
    store.add_requests([("c", [7, 7], ["++", "++"], 1003.0)])
    store.prune(now=1004)  # 7 rows > 5: the oldest whole request goes
    assert store.size() == 4
    assert reason(store.lookup, "a-0", SHA, now=1004) == "unknown_request"
    assert store.lookup("c-1", SHA, now=1004).class_index == 7
    other = PredictionStore(tmp_path / "s.sqlite", max_size=5, ttl_s=100)  # another worker sees them
    assert other.lookup("b-1", SHA, now=1004).class_index == 5
    store.close()
    other.close()

"""Signed receipts for feedback, and the store of recent predictions (DESIGN.md, Monitoring).

Feedback must know what was predicted, and it may reach another worker or replica than
the prediction did. Each prediction therefore returns a **receipt**::

    v2.<base64url(payload)>.<base64url(BLAKE2b-240(key=K(receipt key, model sha256), payload))>
    payload = {"r": request id, "c": predicted class index, "m": the model sha256's first 16 hex digits,
               "s": concept signs of the predicted class ("+"/"-" per concept), "t": issued (unix s),
               "a": subgroup attributes sent with the prediction, "name=value,..." (only when there are any)}
              followed by spaces, to a multiple of 3 bytes (the rows of one request to a common length)

BLAKE2b's keyed mode is a MAC (RFC 7693). Its key ``K`` is derived from the receipt key and the
model's full sha256, so a receipt vouches for the whole hash while carrying 16 digits of it (a
payload under one 128-byte block: one compression per tag). Payloads a whole number of base64
groups long (and of one length within a request) and 30-byte tags let the receipts of a request's
rows be encoded by one encoder call each, instead of three calls per row. Receipts ``v1``
(HMAC-SHA256 over ``"v1." + base64url(payload)``, the full hash in ``m``), issued before this
format, still verify until they expire.

Any gateway holding the key verifies it without shared state. Feedback rules, in order:

* a receipt whose signature does not verify -> 403 ``forged_receipt``;
* a receipt for another model (``m`` differs from the served bundle) -> 409 ``wrong_model``
  (a v2 receipt of another model does not verify with this model's key: one whose ``m`` names
  another model gets 409, not 403; neither is counted);
* a receipt older than ``receipt_ttl_s`` -> 410 ``expired``;
* a verified receipt whose fields do not fit the model (class index outside ``[0, K)``,
  concept signs neither one ``+``/``-`` per concept nor empty (not computed: monitoring off),
  an issue time that is not finite or lies more than ``MAX_CLOCK_SKEW_S`` in the future, a
  request id that is empty or over 128 characters) -> 403 ``forged_receipt``: only a leaked
  key produces one, and a future or NaN time would otherwise never expire;
* only a ``request_id``: looked up in the store of recent predictions of this machine
  (shared by its workers); not there (never issued here, evicted, or older than the TTL)
  -> 404 ``unknown_request``;
* a prediction that already took feedback on this machine -> 409 ``duplicate_feedback``
  (the first label counts; later ones are refused, not overwritten).

The store is an SQLite file in the state directory (WAL mode), bounded to ``store_size``
predictions (the whole requests among the last ``store_size`` rows stored; checked every 1,000
insertions) and to the TTL. The gateway writes one row per request (``add_requests``: the rows'
classes and signs packed, row ``j`` of request ``R`` answering to id ``R-j``), one transaction per
micro-batch: a 64-row request costs one insert, not 64. Each row carries the running count of rows
stored before it, so eviction deletes an index range; request ids are UUIDv7 (``new_request_id``),
so inserts and evictions touch the ends of the id index. Duplicate detection uses the same file;
it covers the workers of one machine. Across replicas a receipt could be replayed once per
replica: put the replicas' ``HANSGATE_STATE_DIR`` on shared storage if that matters.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hansgate.errors import RequestError

__all__ = ["Receipt", "ReceiptSigner", "PredictionStore", "new_request_id"]

_TAG_BYTES = 30  # 240 bits; a multiple of 3: 40 base64 characters, no padding
_MODEL_DIGITS = 16  # of the model's sha256 in a v2 payload (the tag's key covers all of it)
#: how far in the future a receipt's issue time may lie (clock differences between replicas)
MAX_CLOCK_SKEW_S = 300.0
_PLAIN_ID = re.compile(r"[0-9a-zA-Z_-]+")  # ids the gateway mints: JSON needs no escaping for them


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64_bytes(data: bytes) -> bytes:
    """base64url without padding (what ``base64.urlsafe_b64encode(...).rstrip(b"=")`` gives), in one C call each."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=")


def _named_model(payload: bytes) -> str | None:
    """The ``m`` an unverified payload names (``None`` when it names none): only to tell another model's
    receipts from forgeries in the answer."""
    try:
        named = json.loads(payload).get("m")
    except (ValueError, AttributeError):
        return None
    return named if isinstance(named, str) else None


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Receipt:
    """What a receipt vouches for."""

    request_id: str
    class_index: int
    model_sha256: str
    concept_signs: str
    issued_at: float
    #: ``"site=B,stroke=thin"``: declared subgroup attributes sent with the prediction ("" for none), so
    #: that feedback need not repeat them (names and values come from a safe alphabet without , or =)
    attributes: str = ""


class ReceiptSigner:
    """Signs and verifies receipts with one HMAC key for one model."""

    def __init__(self, key: bytes, model_sha256: str, ttl_s: float, n_classes: int | None = None,
                 n_concepts: int | None = None) -> None:
        if len(key) < 16:
            raise ValueError("receipt key must have at least 16 bytes")
        self._key = key
        self.model_sha256 = model_sha256
        self.ttl_s = ttl_s
        self.n_classes = n_classes
        self.n_concepts = n_concepts
        self._hmac = hmac.new(key, digestmod=hashlib.sha256)  # v1 receipts
        self._blake = self._keyed(model_sha256)

    def _keyed(self, model_sha256: str) -> Any:
        """BLAKE2b keyed with ``K(receipt key, model)``, once: a copy per tag skips the key block."""
        k = hashlib.blake2b(self._key + b"\0" + model_sha256.encode(), digest_size=64, person=b"hansgate-rcpt-v2")
        return hashlib.blake2b(key=k.digest(), digest_size=_TAG_BYTES)

    def _mac(self, payload: bytes, model_sha256: str | None = None) -> bytes:
        """The v2 tag of ``payload`` (padded) for this model, or for ``model_sha256``."""
        h = (self._blake if model_sha256 in (None, self.model_sha256) else self._keyed(model_sha256)).copy()
        h.update(payload)
        return h.digest()

    def _mac_v1(self, message: bytes) -> bytes:
        h = self._hmac.copy()  # the keyed state is computed once; copying it is cheaper than hmac.new
        h.update(message)
        return h.digest()

    def sign(self, r: Receipt) -> str:
        # the same bytes json.dumps(separators=(",", ":")) writes; built directly on the hot path
        rid = r.request_id
        quoted = f'"{rid}"' if rid.isascii() and rid.isalnum() or _PLAIN_ID.fullmatch(rid) else json.dumps(rid)
        payload = (f'{{"r":{quoted},"c":{int(r.class_index)},"m":"{r.model_sha256[:_MODEL_DIGITS]}",'
                   f'"s":"{r.concept_signs}","t":{round(r.issued_at, 3)!r}'
                   + (f',"a":{json.dumps(r.attributes)}}}' if r.attributes else "}")).encode()
        payload = payload.ljust(-(-len(payload) // 3) * 3)
        return (b"v2." + _b64_bytes(payload) + b"." + _b64_bytes(self._mac(payload, r.model_sha256))).decode()

    def sign_rows(self, request_id: str, classes: list[int], signs: list[str], issued_at: float,
                  attributes: list[str] | None = None) -> list[str]:
        """``sign`` for rows ``0..n-1`` of one request (ids ``request_id-j``): the shared parts built once,
        the payloads padded to one length, every row's payload and tag encoded together."""
        if not classes:
            return []
        if not _PLAIN_ID.fullmatch(request_id):
            return [self.sign(Receipt(f"{request_id}-{j}", c, self.model_sha256, s, issued_at,
                                      attributes[j] if attributes else ""))
                    for j, (c, s) in enumerate(zip(classes, signs))]
        head = f'{{"r":"{request_id}-'
        model = f',"m":"{self.model_sha256[:_MODEL_DIGITS]}","s":"'
        tail = f'","t":{round(issued_at, 3)!r}'
        rests = [f',"a":{json.dumps(a)}}}' if a else "}" for a in attributes] if attributes else ["}"] * len(classes)
        payloads = [f'{head}{j}","c":{c}{model}{s}{tail}{rest}'
                    for j, c, s, rest in zip(range(len(classes)), classes, signs, rests)]  # ASCII: plain id, JSON
        width = -(-max(map(len, payloads)) // 3) * 3
        raw = "".join([p.ljust(width) for p in payloads]).encode()
        copy, tags = self._blake.copy, []
        for i in range(0, len(raw), width):
            m = copy()
            m.update(raw[i:i + width])
            tags.append(m.digest())
        text = binascii.b2a_base64(raw, newline=False).translate(_URLSAFE)
        encoded = binascii.b2a_base64(b"".join(tags), newline=False).translate(_URLSAFE)
        step, tag_step = width // 3 * 4, _TAG_BYTES // 3 * 4
        return [(b"v2." + text[i:i + step] + b"." + encoded[k:k + tag_step]).decode()
                for i, k in zip(range(0, len(text), step), range(0, len(encoded), tag_step))]

    def verify(self, token: str, now: float | None = None) -> Receipt:
        """The receipt's content, or a ``RequestError`` (forged, wrong model, expired)."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] not in ("v1", "v2"):
            raise RequestError("receipt is malformed", "forged_receipt")
        try:
            sig, raw = _unb64(parts[2]), _unb64(parts[1])
        except (ValueError, TypeError):
            raise RequestError("receipt is malformed", "forged_receipt") from None
        v2 = parts[0] == "v2"
        expected = self._mac(raw) if v2 else self._mac_v1(f"{parts[0]}.{parts[1]}".encode())
        if not hmac.compare_digest(sig, expected):
            named = _named_model(raw) if v2 else None
            if named is not None and named[:_MODEL_DIGITS] != self.model_sha256[:_MODEL_DIGITS]:
                raise RequestError("receipt is for another model than the one served", "wrong_model")
            raise RequestError("receipt signature does not verify", "forged_receipt")
        try:
            p = json.loads(raw)
            fields = (p["r"], p["c"], p["m"], p["s"], p["t"], p.get("a", ""))
        except (ValueError, KeyError, TypeError):  # signed by us, so only a key compromise gets here
            raise RequestError("receipt payload is malformed", "forged_receipt") from None
        receipt = self._checked(*fields)
        if v2:  # verified with this model's key: it vouches for this model's whole hash
            if receipt.model_sha256 != self.model_sha256[:_MODEL_DIGITS]:
                raise RequestError("receipt payload has an invalid model hash", "forged_receipt")
            receipt = dataclasses.replace(receipt, model_sha256=self.model_sha256)
        if receipt.model_sha256 != self.model_sha256:
            raise RequestError("receipt is for another model than the one served", "wrong_model")
        now = time.time() if now is None else now
        if receipt.issued_at > now + MAX_CLOCK_SKEW_S:
            raise RequestError("receipt was issued in the future", "forged_receipt")
        if now - receipt.issued_at > self.ttl_s:
            raise RequestError(f"receipt expired ({self.ttl_s:g} s TTL)", "expired")
        return receipt

    def _checked(self, rid: object, cls: object, sha: object, signs: object, issued: object,
                 attributes: object = "") -> Receipt:
        """Every field of a verified payload, typed and in range (``forged_receipt`` otherwise)."""
        def bad(what: str) -> RequestError:
            return RequestError(f"receipt payload has an invalid {what}", "forged_receipt")

        if not isinstance(rid, str) or not 0 < len(rid) <= 128:
            raise bad("request id")
        if type(cls) is not int or cls < 0 or (self.n_classes is not None and cls >= self.n_classes):
            raise bad("class index")
        if not isinstance(sha, str):
            raise bad("model hash")
        if not isinstance(signs, str) or set(signs) - {"+", "-"} or \
                (self.n_concepts is not None and len(signs) not in (0, self.n_concepts)):
            raise bad("concept signs")
        if type(issued) not in (int, float) or not math.isfinite(issued):  # type: ignore[arg-type]
            raise bad("issue time")
        if not isinstance(attributes, str) or len(attributes) > 1024:
            raise bad("attribute list")
        return Receipt(rid, cls, sha, signs, float(issued), attributes)  # type: ignore[arg-type]


def new_request_id() -> str:
    """A fresh request id: a UUIDv7 (RFC 9562, section 5.7) in hex, 48 bits of unix milliseconds, then 74
    random bits. Ids that grow with time keep the store's id index appending at one end, where random
    ids would touch a random page of it on every insert and every eviction."""
    rand = int.from_bytes(os.urandom(10), "big")
    value = (time.time_ns() // 1_000_000 << 80 | 0x7 << 76 | (rand >> 62 & 0xFFF) << 64 | 0b10 << 62
             | rand & (1 << 62) - 1)
    return f"{value:032x}"


class PredictionStore:
    """Recent predictions and the ids that already took feedback, shared by a machine's workers.

    ``path``: SQLite file; ``max_size``: predictions kept (oldest evicted); ``ttl_s``: age
    limit of a lookup.
    """

    _PRUNE_EVERY = 1000

    def __init__(self, path: Path, max_size: int, ttl_s: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_size = max_size
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS predictions (id TEXT PRIMARY KEY, class INTEGER NOT NULL, "
                         "signs TEXT NOT NULL, issued REAL NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS predictions_issued ON predictions (issued)")
        self._db.execute("CREATE TABLE IF NOT EXISTS requests (id TEXT PRIMARY KEY, classes TEXT NOT NULL, "
                         "signs TEXT NOT NULL, n INTEGER NOT NULL, issued REAL NOT NULL, "
                         "rows_before INTEGER NOT NULL DEFAULT 0)")
        self._add_rows_before()
        self._db.execute("CREATE INDEX IF NOT EXISTS requests_issued ON requests (issued)")
        self._db.execute("CREATE INDEX IF NOT EXISTS requests_rows_before ON requests (rows_before)")
        self._db.execute("CREATE TABLE IF NOT EXISTS feedback (id TEXT PRIMARY KEY, received REAL NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS feedback_received ON feedback (received)")
        self._since_prune = 0

    def add(self, rows: list[tuple[str, int, str, float]]) -> None:
        """Remember ``(request_id, class_index, concept_signs, issued_at)`` rows."""
        with self._lock:
            with self._transaction() as db:
                db.executemany("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?)", rows)
            self._inserted(len(rows))

    def add_requests(self, requests: list[tuple[str, list[int], list[str], float]]) -> None:
        """Remember whole requests ``(request_id, class per row, concept signs per row, issued_at)`` in one
        transaction; row ``j`` is looked up as ``f"{request_id}-{j}"``. Each row gets ``rows_before``, the
        running count of rows, read under the write lock."""
        packed = [(rid, ",".join(map(str, classes)), "".join(signs), len(classes), issued)
                  for rid, classes, signs, issued in requests]
        with self._lock:
            with self._transaction() as db:
                before, rows = self._rows_issued(), []
                for row in packed:
                    rows.append((*row, before))
                    before += row[3]
                db.executemany("INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._inserted(sum(row[3] for row in packed))

    def _rows_issued(self) -> int:
        """The running count after the newest request (``rows_before + n``; 0 when empty): one index seek."""
        row = self._db.execute("SELECT rows_before + n FROM requests ORDER BY rows_before DESC LIMIT 1").fetchone()
        return 0 if row is None else int(row[0])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed or rolled back (``BEGIN IMMEDIATE``: the write lock first)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _inserted(self, predictions: int) -> None:
        """Count insertions (under ``_lock``); prune once every ``_PRUNE_EVERY`` predictions."""
        self._since_prune += predictions
        if self._since_prune >= self._PRUNE_EVERY:
            self._since_prune = 0
            self._prune()

    def _prune(self, now: float | None = None) -> None:
        """Evict in one transaction: rows past the TTL, then the oldest beyond ``max_size``."""
        cutoff = (time.time() if now is None else now) - self.ttl_s
        with self._transaction() as db:
            db.execute("DELETE FROM predictions WHERE issued < ?", (cutoff,))
            db.execute("DELETE FROM predictions WHERE rowid IN (SELECT rowid FROM predictions ORDER BY issued DESC "
                       "LIMIT -1 OFFSET ?)", (self.max_size,))
            # whole requests among the last max_size rows issued stay: a request goes when it and the
            # requests after it hold more (an index range over the oldest, not a walk over the table)
            db.execute("DELETE FROM requests WHERE rows_before < ?", (self._rows_issued() - self.max_size,))
            db.execute("DELETE FROM requests WHERE issued < ?", (cutoff,))
            db.execute("DELETE FROM feedback WHERE received < ?", (cutoff,))

    def _add_rows_before(self) -> None:
        """Give a store written before ``rows_before`` existed that column, counted in issue order."""
        def missing() -> bool:
            return "rows_before" not in {col[1] for col in self._db.execute("PRAGMA table_info(requests)")}

        if not missing():
            return
        with self._transaction() as db:
            if missing():  # another worker may have added it meanwhile
                db.execute("ALTER TABLE requests ADD COLUMN rows_before INTEGER NOT NULL DEFAULT 0")
                counted, before = [], 0
                for rowid, n in db.execute("SELECT rowid, n FROM requests ORDER BY issued, rowid").fetchall():
                    counted.append((before, rowid))
                    before += n
                db.executemany("UPDATE requests SET rows_before = ? WHERE rowid = ?", counted)

    def prune(self, now: float | None = None) -> None:
        """Evict now (normally every ``_PRUNE_EVERY`` insertions)."""
        with self._lock:
            self._prune(now)

    def lookup(self, request_id: str, model_sha256: str, now: float | None = None) -> Receipt:
        """The stored prediction, or ``RequestError('unknown_request')``."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute("SELECT class, signs, issued FROM predictions WHERE id = ?",
                                   (request_id,)).fetchone()
            head, _, index = request_id.rpartition("-")
            if row is None and head and index.isdigit() and index.isascii():
                packed = self._db.execute("SELECT classes, signs, n, issued FROM requests WHERE id = ?",
                                          (head,)).fetchone()
                j = int(index)
                if packed is not None and j < packed[2] and str(j) == index:
                    width = len(packed[1]) // packed[2]
                    row = (packed[0].split(",")[j], packed[1][j * width:(j + 1) * width], packed[3])
        if row is None or now - row[2] > self.ttl_s:
            raise RequestError(f"no recent prediction with request_id {request_id[:64]!r} on this replica "
                               "(send the receipt instead)", "unknown_request")
        return Receipt(request_id, int(row[0]), model_sha256, str(row[1]), float(row[2]))

    def claim(self, request_id: str, now: float | None = None) -> None:
        """Mark a prediction as labelled; ``RequestError('duplicate_feedback')`` when it already was."""
        now = time.time() if now is None else now
        with self._lock:
            try:
                self._db.execute("INSERT INTO feedback VALUES (?, ?)", (request_id, now))
            except sqlite3.IntegrityError:
                raise RequestError(f"prediction {request_id[:64]!r} already took feedback",
                                   "duplicate_feedback") from None

    def release(self, request_id: str) -> None:
        """Undo ``claim`` (when counting the feedback failed afterwards)."""
        with self._lock:
            self._db.execute("DELETE FROM feedback WHERE id = ?", (request_id,))

    def size(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT (SELECT count(*) FROM predictions) + "
                                        "(SELECT coalesce(sum(n), 0) FROM requests)").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

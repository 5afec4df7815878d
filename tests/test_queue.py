from __future__ import annotations

import multiprocessing
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import func, select, text

from nicd.store import catalog, migrate, queue
from nicd.store.catalog import Signature
from nicd.store.engine import Store
from nicd.store.models import Bitstream, File, Job


def sha(i: int) -> str:
    return f"{i:064x}"


def blob(s: str) -> dict:
    return {"content_sha256": s, "data": b"nicd" + s.encode(), "data_sha256": "0" * 64, "width": 8, "height": 8,
            "original_bytes": 100, "nicd_bytes": 68, "bpp": 8.5, "model": "m", "quality": 6}


def states(store) -> dict[str, str]:
    with store.read() as conn:
        return dict(conn.execute(select(Job.content_sha256, Job.state)).all())


def test_enqueue_is_idempotent_and_content_is_the_identity(store):
    sig = Signature(10, 1, 1, 1, 1)
    with store.write() as conn:
        a = catalog.record_hashed(conn, "/r/a.jpg", "/r", sig, sha(1), width=4, height=4)
        b = catalog.record_hashed(conn, "/r/copy-of-a.jpg", "/r", sig, sha(1))
        c = catalog.record_hashed(conn, "/r/a.jpg", "/r", sig, sha(1))
    assert a == b == c == (a[0], "pending")
    with store.read() as conn:
        assert conn.execute(select(func.count()).select_from(Job)).scalar() == 1
        assert catalog.paths_for_content(conn, sha(1)) == ["/r/a.jpg", "/r/copy-of-a.jpg"]


def test_claim_order_budget_and_filter(store):
    with store.write() as conn:
        queue.enqueue(conn, sha(1), 10, 4000, 4000)  # 16 MP
        queue.enqueue(conn, sha(2), 10, 3000, 3000)  # 9 MP
        queue.enqueue(conn, sha(3), 10, 1000, 1000)  # 1 MP
        queue.enqueue(conn, sha(4), 10, 100, 100)
    with store.write() as conn:
        got = queue.claim(conn, "w1", max_megapixels=20)
    assert [j.content_sha256 for j in got] == [sha(1)]  # the next one would pass the budget
    with store.write() as conn:
        got = queue.claim(conn, "w1", max_megapixels=0.5)
    assert [j.content_sha256 for j in got] == [sha(2)]  # the first job is always taken, however big
    with store.write() as conn:
        got = queue.claim(conn, "w1", job_ids=[4])
    assert [j.id for j in got] == [4] and got[0].attempts == 1
    with store.write() as conn:
        assert queue.claim(conn, "w1", job_ids=[]) == []
        assert [j.id for j in queue.claim(conn, "w1")] == [3]
        assert queue.claim(conn, "w1") == []


def test_fewest_attempts_first_so_a_poison_image_never_blocks_the_queue(store):
    with store.write() as conn:
        queue.enqueue(conn, sha(1), 10)
    with store.write() as conn:
        queue.claim(conn, "dead-worker", limit=1)
    with store.write() as conn:
        queue.enqueue(conn, sha(2), 10)
        queue.requeue_expired(conn, now=time.time() + 10_000)
    with store.write() as conn:
        first = queue.claim(conn, "w", limit=1)
    assert first[0].content_sha256 == sha(2)


def test_complete_needs_the_lease(store):
    with store.write() as conn:
        queue.enqueue(conn, sha(1), 10)
        (job,) = queue.claim(conn, "w1")
    with store.write() as conn:
        assert queue.complete(conn, job.id, "someone-else", blob(sha(1))) is False
        assert queue.fail(conn, job.id, "someone-else", "E_X", "x") is False
    with store.write() as conn:
        assert queue.complete(conn, job.id, "w1", blob(sha(1))) is True
    with store.write() as conn:
        assert queue.complete(conn, job.id, "w1", blob(sha(1))) is False  # done once, never twice
    with store.read() as conn:
        assert conn.execute(select(func.count()).select_from(Bitstream)).scalar() == 1
        row = conn.execute(select(Job.state, Job.lease_owner, Job.finished_at)).one()
    assert row.state == "done" and row.lease_owner is None and row.finished_at is not None


def test_fail_and_skip_record_a_one_line_verdict(store):
    with store.write() as conn:
        queue.enqueue(conn, sha(1), 10)
        queue.enqueue(conn, sha(2), 10)
        a, b = queue.claim(conn, "w")
        assert queue.fail(conn, a.id, "w", "E_TRUNCATED", "truncated data\nTraceback ...")
        assert queue.fail(conn, b.id, "w", "E_VANISHED", "gone", state="skipped")
    with store.read() as conn:
        rows = {r.content_sha256: r for r in conn.execute(select(Job.content_sha256, Job.state, Job.error_code, Job.error_message))}
    assert (rows[sha(1)].state, rows[sha(1)].error_code, rows[sha(1)].error_message) == ("failed", "E_TRUNCATED", "truncated data")
    assert (rows[sha(2)].state, rows[sha(2)].error_code) == ("skipped", "E_VANISHED")
    with store.write() as conn:  # the content came back: a skipped-vanished job is pending again
        assert queue.enqueue(conn, sha(2), 10)[1] == "pending"
        assert queue.enqueue(conn, sha(1), 10)[1] == "failed"  # a real failure stays a failure


def test_release_does_not_count_an_attempt(store):
    with store.write() as conn:
        queue.enqueue(conn, sha(1), 10)
        queue.claim(conn, "w")
        assert queue.release(conn, "w") == 1
        (job,) = queue.claim(conn, "w")
    assert job.attempts == 1


def test_requeue_expired_and_attempt_limit(store):
    with store.write() as conn:
        queue.enqueue(conn, sha(1), 10)
        queue.enqueue(conn, sha(2), 10)
    now = time.time()
    for k in range(queue.MAX_ATTEMPTS):
        with store.write() as conn:
            got = queue.claim(conn, f"w{k}", job_ids=[1], lease_seconds=10, now=now)
            assert got and got[0].attempts == k + 1
            assert queue.requeue_expired(conn, now=now + 5) == {"requeued": 0, "failed": 0}  # lease still valid
            res = queue.requeue_expired(conn, now=now + 11)
    assert res == {"requeued": 0, "failed": 1}
    with store.read() as conn:
        row = conn.execute(select(Job.state, Job.error_code).where(Job.id == 1)).one()
    assert tuple(row) == ("failed", "E_TOO_MANY_ATTEMPTS")


def test_exclusive_recovery_takes_back_every_other_lease(store):
    with store.write() as conn:
        queue.enqueue(conn, sha(1), 10)
        queue.enqueue(conn, sha(2), 10)
        queue.claim(conn, "old-process", job_ids=[1])
        queue.claim(conn, "me", job_ids=[2])
        assert queue.requeue_expired(conn, current_owner="me") == {"requeued": 0, "failed": 0}
        assert queue.requeue_expired(conn, current_owner="me", exclusive=True) == {"requeued": 1, "failed": 0}
    assert states(store) == {sha(1): "pending", sha(2): "running"}


def _claim_worker(url: str, owner: str, out):
    s = Store(url, take_lock=False)
    got = []
    try:
        while True:
            with s.write() as conn:
                jobs = queue.claim(conn, owner, limit=3)
            if not jobs:
                break
            got.extend(j.id for j in jobs)
    finally:
        s.close()
    out.put(got)


def test_concurrent_claimers_never_share_a_job(tmp_path):
    """Real processes, one SQLite file: BEGIN IMMEDIATE makes each claim atomic."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    with Store(url) as s:
        migrate.ensure_schema(s)
        with s.write() as conn:
            for i in range(300):
                queue.enqueue(conn, sha(i), 10)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_worker, args=(url, f"w{k}", out)) for k in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    ids = [i for r in results for i in r]
    assert len(ids) == 300 and len(set(ids)) == 300


class QueueMachine(RuleBasedStateMachine):
    """Design §L: random sequences of queue operations on a real SQLite file, with crashes."""

    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.url = f"sqlite:///{self.dir.name}/q.db"
        self.store = Store(self.url)
        migrate.ensure_schema(self.store)
        self.owner = queue.new_owner()
        self.held: dict[int, str] = {}  # job id -> sha, as this worker believes
        self.discovered: set[str] = set()
        self.now = time.time()

    def teardown(self):
        self.store.close()
        self.dir.cleanup()

    @rule(i=st.integers(0, 12), path=st.integers(0, 3))
    def discover(self, i, path):
        with self.store.write() as conn:
            catalog.record_hashed(conn, f"/r/{path}/{i}.jpg", "/r", Signature(1, 1, 1, 1, 1), sha(i))
        self.discovered.add(sha(i))

    @rule(n=st.integers(1, 4))
    def claim(self, n):
        with self.store.write() as conn:
            for j in queue.claim(conn, self.owner, limit=n, lease_seconds=60, now=self.now):
                assert j.id not in self.held
                self.held[j.id] = j.content_sha256

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def complete(self, data):
        job_id = data.draw(st.sampled_from(sorted(self.held)))
        with self.store.write() as conn:
            assert queue.complete(conn, job_id, self.owner, blob(self.held.pop(job_id)))

    @precondition(lambda self: self.held)
    @rule(data=st.data(), skip=st.booleans())
    def fail(self, data, skip):
        job_id = data.draw(st.sampled_from(sorted(self.held)))
        self.held.pop(job_id)
        with self.store.write() as conn:
            assert queue.fail(conn, job_id, self.owner, "E_X", "x", state="skipped" if skip else "failed")

    @rule()
    def crash_and_recover(self):
        self.store.close()
        self.store = Store(self.url)
        self.owner = queue.new_owner()
        self.held.clear()
        with self.store.write() as conn:
            queue.requeue_expired(conn, current_owner=self.owner, exclusive=True, now=self.now)

    @rule()
    def leases_expire(self):
        self.now += 120
        with self.store.write() as conn:
            queue.requeue_expired(conn, now=self.now)
        self.held.clear()

    @invariant()
    def consistent(self):
        with self.store.read() as conn:
            jobs = conn.execute(select(Job.id, Job.content_sha256, Job.state, Job.attempts, Job.lease_owner,
                                       Job.lease_expires_at)).all()
            blobs = set(conn.execute(select(Bitstream.content_sha256)).scalars())
            linked = set(conn.execute(select(File.content_sha256)).scalars())
        assert {j.content_sha256 for j in jobs} == self.discovered  # one job per discovered content
        assert len(jobs) == len({j.content_sha256 for j in jobs})
        assert blobs == {j.content_sha256 for j in jobs if j.state == "done"}  # done <=> verified blob
        assert linked == self.discovered
        for j in jobs:
            assert j.attempts <= queue.MAX_ATTEMPTS
            if j.state == "running":
                assert j.lease_owner == self.owner and j.id in self.held and j.lease_expires_at > self.now
            else:
                assert j.lease_owner is None and j.id not in self.held


QueueMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_queue_state_machine = QueueMachine.TestCase


def test_a_job_interrupted_once_is_retried_alone(store):
    """A crash during a batch must not spend the attempts of every image batched with the culprit."""
    with store.write() as conn:
        for i in range(4):
            queue.enqueue(conn, sha(i), 10)
        assert len(queue.claim(conn, "dead", limit=3)) == 3
        queue.requeue_expired(conn, current_owner="me", exclusive=True)
    with store.write() as conn:
        fresh = queue.claim(conn, "me", limit=8)
        assert [j.content_sha256 for j in fresh] == [sha(3)]  # fresh work first
        retried = [queue.claim(conn, "me", limit=8) for _ in range(3)]
    assert [[j.content_sha256 for j in b] for b in retried] == [[sha(0)], [sha(1)], [sha(2)]]
    assert all(b[0].attempts == 2 for b in retried)

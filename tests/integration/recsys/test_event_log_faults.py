"""The event logs' promises under faults, and proof that each check can fail.

A check that passes on every log proves nothing, so each one here also runs against a log
broken on purpose by a failpoint (``recsys.faults``) and must catch it:

- durability: a writer process appends, reports each acknowledged batch, and is killed with
  SIGKILL; every acknowledged event must be in the log. A log that acknowledges before
  writing (``event_log.ack_before_write``) fails that check.
- Redis batches larger than one script call are all or nothing: a malformed event in the
  last call stores nothing, and a reader never sees part of a batch. A log that sends its
  script calls one by one (``event_log.commit_per_row``) fails that check.
- a Redis whose ``appendfsync`` cannot be read (CONFIG denied by an ACL) is refused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.event_log.redis_streams import EventLogDurabilityError, RedisStreamsEventLog
from recsys.event_log.sqlite import SqliteEventLog
from recsys.faults import ACK_BEFORE_WRITE, COMMIT_PER_ROW, FAILPOINTS_ENV
from tests.support.paths import REPO
from tests.support.redis_server import RedisProc, aof_redis

pytestmark = pytest.mark.integration
ACKED_BEFORE_KILL = 200

# The writer: appends batches of 5 and prints each batch's ids once ``append`` returned
# (the gateway's 2xx), until it is killed.
WRITER = """
import sys
from datetime import UTC, datetime
backend, where = sys.argv[1], sys.argv[2]
if backend == "sqlite":
    from pathlib import Path
    from recsys.event_log.sqlite import SqliteEventLog
    log = SqliteEventLog(Path(where))
else:
    from recsys.event_log.redis_streams import RedisStreamsEventLog
    log = RedisStreamsEventLog(where, sys.argv[3])
n = 0
while True:
    batch = [{"event_id": f"w{n}-{j}", "user_id": "u1", "item_id": "i1", "event_type": "view",
              "value": None, "ts": datetime.now(UTC).isoformat(), "session_id": "s1",
              "device": "mobile", "request_id": None} for j in range(5)]
    log.append(batch)
    print(" ".join(e["event_id"] for e in batch), flush=True)
    n += 1
"""


def event(event_id: str) -> dict:
    return {
        "event_id": event_id, "user_id": "u1", "item_id": "i1", "event_type": "click", "value": None,
        "ts": "2026-11-20T12:00:00+00:00", "session_id": "s1", "device": "mobile", "request_id": None,
    }  # fmt: skip


@pytest.fixture(scope="module")
def redis_aof(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    with aof_redis(tmp_path_factory.mktemp("redis-faults")) as server:
        yield server


def _kill_while_appending(args: list[str], failpoint: str = "") -> list[str]:
    """Run the writer until it reported ``ACKED_BEFORE_KILL`` events, SIGKILL it; the acked ids."""
    env = {**os.environ, FAILPOINTS_ENV: failpoint, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, *args], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    acked: list[str] = []
    try:
        assert proc.stdout is not None
        while len(acked) < ACKED_BEFORE_KILL:
            line = proc.stdout.readline()
            assert line, f"the writer ended with {proc.wait()} before {ACKED_BEFORE_KILL} events"
            acked += line.split()
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown, no flush, no pending timer runs
        proc.wait()
    return acked


def _check_every_acknowledged_event_is_in_the_log(acked: list[str], logged: list[str]) -> None:
    missing = set(acked) - set(logged)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged events are not in the log"


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_sigkill_loses_no_acknowledged_event_and_the_check_catches_a_log_that_does(
    backend: str, redis_aof: RedisProc, tmp_path: Path
) -> None:
    def run(name: str, failpoint: str = "") -> tuple[list[str], list[str]]:
        if backend == "sqlite":
            path = tmp_path / f"{name}.db"
            acked = _kill_while_appending(["sqlite", str(path)], failpoint)
            log: SqliteEventLog | RedisStreamsEventLog = SqliteEventLog(path)
        else:
            acked = _kill_while_appending(["redis", redis_aof.url, f"{{t}}:{name}"], failpoint)
            log = RedisStreamsEventLog(redis_aof.url, f"{{t}}:{name}")
        try:
            return acked, log.event_ids()
        finally:
            log.close()

    _check_every_acknowledged_event_is_in_the_log(*run("durable"))
    # The same check on a log that answers before it writes: the killed writer's acknowledged
    # events were never written, and the check says so.
    with pytest.raises(AssertionError, match="acknowledged events are not in the log"):
        _check_every_acknowledged_event_is_in_the_log(*run("ack-first", ACK_BEFORE_WRITE))


def _check_a_batch_of_several_script_calls_is_all_or_nothing(url: str, prefix: str) -> None:
    """A batch of 4 script calls (2 events each) whose last event is malformed stores nothing;
    one of 200 calls is seen by a concurrent reader either not at all or whole."""
    log = RedisStreamsEventLog(url, prefix, batch=2)
    try:
        with pytest.raises(KeyError):
            log.append([event(f"m{n}") for n in range(7)] + [{"user_id": "u1"}])  # no event_id
        assert log.count() == 0, f"a failed batch left {log.event_ids()} in the log"

        seen: set[int] = set()
        done = threading.Event()
        reader = RedisStreamsEventLog(url, prefix, require_fsync=False)

        def watch() -> None:
            while not done.is_set():
                seen.add(reader.count())

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            log.append([event(f"b{n}") for n in range(400)])
        finally:
            done.set()
            watcher.join()
            reader.close()
        seen.add(log.count())
        assert seen <= {0, 400}, f"a reader saw part of a batch: {sorted(seen)}"
    finally:
        log.close()


def test_redis_batches_of_several_script_calls_are_all_or_nothing(redis_aof: RedisProc) -> None:
    _check_a_batch_of_several_script_calls_is_all_or_nothing(redis_aof.url, "{t}:batch")


def test_the_all_or_nothing_check_fails_on_redis_calls_sent_one_by_one(
    redis_aof: RedisProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAILPOINTS_ENV, COMMIT_PER_ROW)
    with pytest.raises(AssertionError, match="a reader saw part of a batch"):
        _check_a_batch_of_several_script_calls_is_all_or_nothing(redis_aof.url, "{t}:batch-broken")


def test_a_redis_whose_fsync_setting_cannot_be_read_is_refused(redis_aof: RedisProc) -> None:
    import redis

    # A user that may do everything but CONFIG, as managed services and hardened ACLs have it.
    admin = redis.Redis.from_url(redis_aof.url)
    admin.acl_setuser("noconfig", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                      commands=["+@all", "-config"])  # fmt: skip
    admin.close()
    url = f"redis://noconfig:pw@127.0.0.1:{redis_aof.port}/0"
    with pytest.raises(EventLogDurabilityError, match="cannot verify .* fsyncs every write"):
        RedisStreamsEventLog(url, "{t}:noconfig")
    # A reader acknowledges nothing (the canary analysis): it opens, with a warning.
    reader = RedisStreamsEventLog(url, "{t}:noconfig", require_fsync=False)
    assert reader.fsync is None
    reader.close()

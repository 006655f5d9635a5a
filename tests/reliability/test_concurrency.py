"""Two runs doing the same work at once: one does it, the other waits and reuses it; output is never interleaved;
a lock whose holder died is taken over."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

from tests.reliability.conftest import train_config, wait_for
from tests.reliability.test_storage_faults import verify_dataset
from vit import storage

PREPARE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from vit.data import prepare_dataset
    go = Path(sys.argv[2])
    while not go.exists():  # both processes start preparing at the same moment
        time.sleep(0.01)
    print(prepare_dataset("synthetic-upstream:", "up", sys.argv[1], classes=10, per_class=100, size=32,
                          shard_samples=50, workers=1))
    """
)


def summaries(text: str) -> tuple[int, int]:
    """(how many preparations ran, how many waited for another one)."""
    return text.count("prepared up (synthetic-upstream)"), text.count("waiting to reuse it")


def test_two_processes_preparing_one_local_dataset(tmp_path):
    root, go = tmp_path / "artifacts", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", PREPARE, str(root), str(go)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    time.sleep(0.5)
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    uris = {out.strip() for out, _ in outputs}
    assert len(uris) == 1
    counts = [summaries(err) for _, err in outputs]
    assert sorted(counts) == [(0, 1), (1, 0)], outputs  # one prepared, the other waited for it
    uri = uris.pop()
    info = json.loads(storage.read_text(f"{uri}/info.json"))
    assert verify_dataset(uri) == sum(info["counts"].values()) and info["counts"]["train"] == 1000
    assert not os.path.exists(f"{uri}.lock")


def test_two_threads_preparing_one_dataset_on_s3(s3_bucket, capsys):
    from vit.data import prepare_dataset

    root = f"{s3_bucket}/vitflow"
    barrier = threading.Barrier(2)
    uris: list[str] = []

    def prepare() -> None:
        barrier.wait()
        uris.append(prepare_dataset("synthetic-upstream:", "up", root, classes=10, per_class=60, size=32, workers=1))

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(uris) == 2 and uris[0] == uris[1]
    assert summaries(capsys.readouterr().err) == (1, 1)
    assert verify_dataset(uris[0]) > 0 and not storage.exists(f"{uris[0]}.lock")


def test_a_dead_holders_lock_is_taken_over(tmp_path, s3_bucket):
    # local: the holder is SIGKILLed while holding the lock; the kernel drops its flock
    lock_file = tmp_path / "stage.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vit import storage\n"
         "lock = storage.exclusive(sys.argv[1], lambda: False)\nprint('held', flush=True)\ntime.sleep(120)",
         str(lock_file)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    waiter: list = []
    thread = threading.Thread(target=lambda: waiter.append(storage.exclusive(str(lock_file), lambda: False, poll=0.1)))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # blocked while the holder lives
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    thread.join(timeout=10)
    assert waiter and waiter[0] is not None
    waiter[0].release()

    # S3: a lock object whose holder (this host) no longer exists is taken over at once ...
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = {"token": "x", "host": socket.gethostname(), "pid": int(dead.stdout), "since": 0}
    lock_uri = f"{s3_bucket}/stages/pretrain/x/0123.lock"
    storage.write_text(lock_uri, json.dumps(owner))
    with storage.exclusive(lock_uri, lambda: False, poll=0.1) as lock:
        assert json.loads(storage.read_text(lock.uri))["pid"] == os.getpid()
    assert not storage.exists(lock_uri)
    # ... one from another host after its heartbeat is older than the TTL ...
    storage.write_text(lock_uri, json.dumps({**owner, "host": "elsewhere", "pid": 1}))
    start = time.monotonic()
    with storage.exclusive(lock_uri, lambda: False, ttl=1.0, poll=0.2):
        assert time.monotonic() - start >= 1.0
    # ... and a live holder's lock is waited on until its output appears, then the output is reused
    held = storage.exclusive(lock_uri, lambda: False)
    finished_at = time.monotonic() + 1.0
    assert storage.exclusive(lock_uri, lambda: time.monotonic() > finished_at, ttl=60, poll=0.1) is None
    held.release()


def test_two_runs_of_one_training_stage_at_once(tiny_dataset, tmp_path, monkeypatch):
    """Through the task layer: two `train` tasks of the same stage in parallel (as two flow runs would); one
    trains, the other waits for its ``_done.json`` and returns the same result. MLflow is unreachable here
    (nothing listens on its port), and so is Prefect's API: the tasks must shrug both off."""
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from tasks.common import TrackingContext, stage_uri
    from tasks.launch import Launch
    from tasks.prepare import dataset_ref
    from tasks.stages import TrainStage
    from tasks.train import train_task
    from vit.engine.config import TrainConfig

    monkeypatch.setenv("VITFLOW_MLFLOW_FLUSH_SECONDS", "0")
    root = str(tmp_path / "artifacts")
    config = train_config(tiny_dataset, "", steps=12, every=4)
    tracking = TrackingContext("http://127.0.0.1:9", "0", None, {})
    key = {"config": config}
    uri = stage_uri(root, "pretrain", "pretrain:same", key)
    stage = TrainStage(kind="pretrain", name="pretrain:same", title="pretrain same", uri=uri,
                       config=TrainConfig.from_dict(config), launch=Launch(threads=1), tracking=tracking,
                       datasets=[dataset_ref(tiny_dataset)])  # fmt: skip
    barrier = threading.Barrier(2)
    results: list[dict] = []

    def run() -> None:
        # outside a flow run there is no Prefect API to show progress on: refuse at once rather than start one
        dead_api = {PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 0}
        with temporary_settings(dead_api):
            barrier.wait()
            results.append(train_task.fn(stage))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 2 and results[0] == results[1] and results[0].step == 12
    lines = storage.read_text(f"{uri}/events.jsonl").splitlines()
    starts = [json.loads(line) for line in lines if '"start"' in line]
    assert len(starts) == 1 and starts[0]["resumed_from"] is None  # trained once, by one of the two
    assert wait_for(lambda: not os.path.exists(f"{uri}.lock"), "the lock to be released", timeout=5)


FENCED_HOLDER = textwrap.dedent(
    """
    import subprocess, sys
    from vit import storage
    stage, ttl = sys.argv[1], float(sys.argv[2])
    lock = storage.exclusive(stage + ".lock", lambda: False, ttl=ttl)
    # a child process (as the training engine is) writes into the stage folder all the time
    writer = subprocess.Popen([sys.executable, "-c", sys.argv[3], stage])
    print("held", writer.pid, flush=True)
    sys.stdin.readline()  # the test pauses this process past the TTL, resumes it, then says go
    try:
        storage.write_text(stage + "/_done.json", "{}")
    except storage.StorageError as exc:
        print("refused", type(exc).__name__, exc, flush=True)
    print("writer exit", writer.wait(), flush=True)
    """
)
FENCED_WRITER = textwrap.dedent(
    """
    import sys, time
    from vit import storage
    for i in range(100000):
        try:
            storage.write_text(f"{sys.argv[1]}/checkpoints/old-{i:05d}", "old holder")
        except storage.StorageError as exc:
            print("writer refused", type(exc).__name__, exc, flush=True)
            sys.exit(3)
        time.sleep(0.05)
    """
)


def test_a_holder_paused_past_the_ttl_stops_writing_once_its_lock_is_taken(s3_bucket):
    """The holder of a stage's S3 lock (and the process it started, which writes the checkpoints) is frozen with
    SIGSTOP past the TTL: a second run takes the lock over and writes the stage. Once the first one is resumed,
    neither it nor its child writes anything more into the stage folder: every write under a held prefix first
    checks that the lock is still its own."""
    ttl = 3.0
    stage = f"{s3_bucket}/stages/pretrain/x/0123"
    holder = subprocess.Popen(
        [sys.executable, "-c", FENCED_HOLDER, stage, str(ttl), FENCED_WRITER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().startswith("held")
        old = lambda: [u for u in storage.list_files(stage) if "/old-" in u]  # noqa: E731
        wait_for(lambda: len(old()) >= 3, "the old holder's child to write", timeout=60)
        os.kill(holder.pid, signal.SIGSTOP)  # its heartbeat stops; its child goes on writing
        with storage.exclusive(f"{stage}.lock", lambda: False, ttl=ttl, poll=0.2) as lock:
            written_by_old = old()
            assert json.loads(storage.read_text(lock.uri))["pid"] == os.getpid()
            storage.write_text(f"{stage}/checkpoints/new", "new holder")
            os.kill(holder.pid, signal.SIGCONT)
            holder.stdin.write("go\n")
            holder.stdin.flush()
            out, _ = holder.communicate(timeout=60)
            assert old() == written_by_old, "the old holder's child wrote after the takeover"
            assert not storage.exists(f"{stage}/_done.json"), "the old holder wrote after the takeover"
            assert "refused LockLost" in out and "writer exit 3" in out, out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)  # the holder and its writer, whatever happened
        holder.wait()


def test_the_lock_ttl_outlasts_the_storage_retry_window():
    """A holder whose heartbeat is stuck in botocore's retries (an S3 outage) must not lose its lock for that."""
    assert storage.lock_ttl() > storage.S3_RETRY_WINDOW + storage.lock_ttl() / 10

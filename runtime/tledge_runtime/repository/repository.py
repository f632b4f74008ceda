"""``ModelRepository``: the model a device runs, kept current from ``DIR/<name>/<version>/``, verified and swapped live.

For an embedded camera app (``tledge-runtime serve --model-dir`` uses the same object)::

    repo = ModelRepository("models/", trusted_keys=["fleet.pub"])   # loads the best version now
    ...
    repo.refresh()                          # call it every few seconds (or after an update arrives)
    with repo.lease() as model:             # the version serving now, held until the block ends
        model.version, model.classifier.predict(frame)

The version served is the highest one that is complete (:func:`~tledge_runtime.repository.versions.incomplete`),
verifies against a trusted key (when keys are given), loads, passes the reference check it carries and
a warm-up run. A new version goes through those steps on the caller's thread while the old one keeps
answering; then one assignment swaps them. A lease taken before the swap keeps the old version's
classifier open until it ends, so a prediction in flight finishes on the version it started on; the
old classifier is closed when its last lease ends, so memory does not grow with the swaps.

A version that fails a step never serves; its reason is logged, kept in :meth:`index` and returned as an
:class:`Event` (``kind`` names the step: ``signature``, ``load``, ``check``, ``rollback``, ``changed``).
It is judged again only if its files change. A version lower than one that has served is refused
(``rollback``) unless ``allow_rollback``, with which removing the serving version's folder falls back to the
highest version below it that passes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tledge_runtime.classifier import Classifier
from tledge_runtime.errors import BackendError, CheckFailed, SignatureError, TledgeError, first_line
from tledge_runtime.repository import versions as vs
from tledge_runtime.repository.folder import snapshot
from tledge_runtime.repository.keys import load_trusted_keys
from tledge_runtime.repository.signature import Verified, signature_status, verify_folder

log = logging.getLogger("tledge_runtime")

READY, UNAVAILABLE = "READY", "UNAVAILABLE"  # the Open Inference Protocol's repository index states


class Loaded:
    """One version loaded and ready: its classifier, the signature it verified with, what each step took.

    Counted while in use (:meth:`acquire` / :meth:`release`); the repository holds one count while it
    serves the version. The classifier is closed when the count reaches zero.
    """

    def __init__(self, version: int, classifier: Classifier, signature: Verified | None, folder: Path,
                 seconds: dict[str, float], identity: tuple):
        self.version, self.classifier, self.signature, self.folder = version, classifier, signature, folder
        self.seconds = seconds  # verify, load, check, warmup
        self.identity = identity  # the folder's files as verified and loaded
        self._lock = threading.Lock()
        self._users = 1

    @property
    def signature_status(self) -> dict[str, Any] | str:
        return signature_status(self.folder, self.signature)

    def acquire(self) -> bool:
        """Count one more user; False when the version has been closed already."""
        with self._lock:
            if self._users == 0:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.classifier.close()
            _return_freed_memory()


@dataclass(frozen=True)
class Event:
    """What one refresh did with one version: ``swap`` (it serves now) or the step that refused it."""

    version: int
    kind: str  # swap | signature | load | check | rollback | changed
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class VersionState:
    """One line of the repository index."""

    name: str
    version: int
    state: str  # READY | UNAVAILABLE
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": str(self.version), "state": self.state, "reason": self.reason}


@dataclass
class _Seen:
    found: vs.Found
    high_then: int | None  # the highest version that had served when this one appeared: below it, a rollback
    refusal: Event | None = None
    waiting: str | None = None


class ModelRepository:
    """Serve the best version of ``root/<name>/`` (``name``: the only model there, unless given).

    ``trusted_keys``: public key files; every version must then be signed by one of them. ``check``: run
    the version's reference check before it serves (the last gate; on by default). ``warmup_batch``:
    images of the warm-up run. ``settle_s``: how long a version's files must stay unchanged before it is
    considered complete. ``device``, ``backend``, ``threads``: as for :class:`Classifier`. The first
    :meth:`refresh` runs in the constructor.
    """

    def __init__(self, root: str | os.PathLike, name: str | None = None, *,
                 trusted_keys: Iterable[Any] | None = None, allow_rollback: bool = False, check: bool = True,
                 device: str = "auto", backend: str | None = None, threads: int | None = None,
                 warmup_batch: int = 1, settle_s: float = vs.DEFAULT_SETTLE_S):
        self.root = Path(root)
        self.name = name if name is not None else _only_model(self.root)
        self.model_dir = self.root / self.name
        self.keys = load_trusted_keys(trusted_keys) if trusted_keys is not None else None
        self.allow_rollback, self.check, self.settle_s = allow_rollback, check, settle_s
        self.warmup_batch = max(1, warmup_batch)
        self._open = {"device": device, "backend": backend, "threads": threads}
        self._lock = threading.Lock()  # one refresh at a time (loading a version takes a while)
        self._swap_lock = threading.Lock()  # guards _current only: leases never wait for a load
        self._current: Loaded | None = None
        self._high: int | None = None  # the highest version that has served (rollback protection)
        self._seen: dict[int, _Seen] = {}
        self._unloaded = False
        self.refresh()

    # ------------------------------------------------------------------ using the current version

    @property
    def current(self) -> Loaded | None:
        return self._current

    def acquire(self) -> Loaded | None:
        """The version serving now with one more count on it (release it), or None when none serves."""
        with self._swap_lock:
            loaded = self._current
            return loaded if loaded is not None and loaded.acquire() else None

    @contextlib.contextmanager
    def lease(self) -> Iterator[Loaded]:
        """The version serving now, kept open until the block ends even if a newer one is swapped in meanwhile."""
        loaded = self.acquire()
        if loaded is None:
            raise BackendError(f"no version of {self.name} serves", hint=self._why_none())
        try:
            yield loaded
        finally:
            loaded.release()

    # ------------------------------------------------------------------ updating

    def refresh(self) -> list[Event]:
        """Scan the model's folder; verify, load, check and warm the best new version and swap it in."""
        with self._lock:
            found = vs.scan(self.model_dir)
            for v, f in found.items():
                seen = self._seen.get(v)
                if seen is None or seen.found.identity != f.identity:  # new, or changed: judged afresh
                    self._seen[v] = _Seen(f, self._high)
            for v in set(self._seen) - set(found):
                del self._seen[v]
            return [] if self._unloaded else self._advance()

    def load(self) -> Loaded:
        """Serve again after :meth:`unload`, or now: refresh and return the version serving (TledgeError if none)."""
        with self._lock:
            self._unloaded = False
        self.refresh()
        loaded = self._current
        if loaded is None:
            raise TledgeError(f"no version of {self.name} can serve", hint=self._why_none())
        return loaded

    def unload(self) -> None:
        """Stop serving (leases in progress finish); :meth:`load` brings the best version back."""
        with self._lock:
            self._unloaded = True
            self._swap(None)

    def close(self) -> None:
        self.unload()

    def index(self) -> list[VersionState]:
        """Every version on disk (and the one serving), highest first, with its state and the reason."""
        with self._lock:
            current = self._current
            versions = set(self._seen) | ({current.version} if current else set())
            return [self._state(v, current) for v in sorted(versions, reverse=True)]

    # ------------------------------------------------------------------ the policy

    def _advance(self) -> list[Event]:
        events: list[Event] = []
        now = time.time_ns()
        for v in sorted(self._seen, reverse=True):
            s = self._seen[v]
            serving = self._current.version if self._current is not None else None
            if s.refusal is not None:
                continue
            if v == serving:
                if s.found.identity != self._current.identity:
                    events.append(self._refuse(s, "changed", f"version {v} changed on disk after it was loaded; "
                                                             "the loaded copy keeps serving"))
                continue
            if self._high is not None and v < self._high and not self.allow_rollback:
                if s.high_then is not None and v < s.high_then:  # arrived below what had served: a rollback
                    events.append(self._refuse(s, "rollback", f"version {v} is older than version {s.high_then}, "
                                                              "which has served (rollbacks need --allow-rollback)"))
                continue  # (versions there before a higher one served are just older: not loaded, not refused)
            if serving is not None and v < serving and serving in self._seen:
                continue  # allow_rollback: lower versions wait until the serving one is removed
            s.waiting = vs.incomplete(s.found, self.keys is not None, self.settle_s, now)
            if s.waiting is not None:
                continue
            event = self._try(s)
            if event is not None:
                events.append(event)
                if event.kind == "swap":
                    break  # lower versions are judged when they matter
        return events

    def _try(self, s: _Seen) -> Event | None:
        """Load one complete version: a ``swap`` event, a refusal, or None when its files were still changing."""
        v = s.found.version
        try:
            loaded = self._load(s.found)
        except _StillChanging as e:
            s.waiting = e.message
            return None
        except SignatureError as e:
            return self._refuse(s, "signature", e.message)
        except CheckFailed as e:
            return self._refuse(s, "check", e.message)
        except TledgeError as e:
            return self._refuse(s, "load", e.message)
        except Exception as e:  # a hostile file may break a library in ways it does not document
            log.exception("%s version %d: loading failed", self.name, v)
            return self._refuse(s, "load", first_line(e))
        self._swap(loaded)
        self._high = v if self._high is None else max(self._high, v)
        steps = ", ".join(f"{k} {1000 * t:.0f} ms" for k, t in loaded.seconds.items())
        log.info("%s: version %d serves (%s; signature %s)", self.name, v, steps, _describe(loaded.signature_status))
        return Event(v, "swap", "", loaded.seconds)

    def _load(self, found: vs.Found) -> Loaded:
        if found.problem is not None:
            raise TledgeError(f"version {found.version} {found.problem}", hint="copy the version folder itself")
        name = vs.model_file(found)
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        verified = verify_folder(found.path, self.keys) if self.keys is not None else None
        seconds["verify"] = time.perf_counter() - t
        t = time.perf_counter()
        clf = Classifier(found.path / name, **self._open)
        seconds["load"] = time.perf_counter() - t
        try:
            if self.check:
                t = time.perf_counter()
                clf.self_check().raise_for_failures()
                seconds["check"] = time.perf_counter() - t
            t = time.perf_counter()
            p = clf.meta.preprocess
            clf.infer(np.zeros((self.warmup_batch, p.height, p.width, 3), dtype=np.uint8))
            seconds["warmup"] = time.perf_counter() - t
            identity = snapshot(found.path).identity
            if identity != (verified.snapshot.identity if verified is not None else found.identity):
                raise _StillChanging("files changed while the version was verified and loaded")
        except BaseException:
            clf.close()
            raise
        return Loaded(found.version, clf, verified, found.path, seconds, identity)

    def _swap(self, new: Loaded | None) -> None:
        with self._swap_lock:
            old, self._current = self._current, new
        if old is not None:
            old.release()  # closed now, or when its last lease ends

    def _refuse(self, s: _Seen, kind: str, reason: str) -> Event:
        s.refusal = Event(s.found.version, kind, reason)
        log.warning("%s: version %d refused (%s): %s", self.name, s.found.version, kind, reason)
        return s.refusal

    def _state(self, v: int, current: Loaded | None) -> VersionState:
        s = self._seen.get(v)
        if current is not None and v == current.version:
            gone = "" if s is not None else "its folder was removed; the loaded copy serves"
            return VersionState(self.name, v, READY, gone)
        if s is None:
            return VersionState(self.name, v, UNAVAILABLE, "removed")
        if s.refusal is not None:
            reason = f"refused ({s.refusal.kind}): {s.refusal.reason}"
        elif self._unloaded:
            reason = "unloaded"
        elif s.waiting is not None:
            reason = f"incomplete: {s.waiting}"
        elif self._high is not None and v < self._high and not self.allow_rollback:
            reason = f"older than version {self._high}, which has served"
        else:
            reason = "not loaded: a higher version serves" if current is not None else "not loaded yet"
        return VersionState(self.name, v, UNAVAILABLE, reason)

    def _why_none(self) -> str:
        states = self.index()
        if not states:
            return f"copy a version folder into {self.model_dir}/<version>/"
        return "; ".join(f"version {s.version}: {s.reason}" for s in states[:3])


def _return_freed_memory() -> None:
    """Hand the memory of a closed version back to the system. Each version is loaded, warmed and run on threads
    of its own, and glibc gives each new thread its own malloc arena; freed model memory stays in those arenas
    unless trimmed, so without this the process grows with every swap (measured: +40% RSS over 20 swaps of an
    EfficientNet-Lite0; flat with it, benchmarks/model_swap.py). No-op where the C library has no malloc_trim."""
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


class _StillChanging(TledgeError):
    """The version's files changed while it was judged: it is incomplete, not refused."""


def _only_model(root: Path) -> str:
    names = [n for n in vs.model_names(root) if not _is_python_model(root / n)]
    if len(names) == 1:
        return names[0]
    raise TledgeError(f"{root}: holds {len(names) or 'no'} models ({', '.join(names) or 'no <name>/<version>/ folder'})",
                      hint="pick one with --name" if names else "copy a model in as <name>/1/model.onnx")


def _is_python_model(folder: Path) -> bool:
    """Triton's Python-backend image models (``<name>_image``): served by tledge as ``<name>_image`` already."""
    return any((v / "model.py").is_file() and not (v / vs.MODEL_FILE).exists()
               for v in folder.iterdir() if v.name.isdigit() and not v.is_symlink())


def _describe(status: dict[str, Any] | str) -> str:
    return f"verified, key {status['key']}" if isinstance(status, dict) else status

"""Where and as whom a submission's kernel runs while it is graded, and how everything it started is ended.

Each submission gets a fresh folder `<base>/<n>/` holding `request/` (written by the grader before the
kernel starts, read-only to the kernel) and `work/` (the kernel's working folder and HOME, where it
writes its answers). Two levels of isolation, chosen once per grading run by `Sandbox.start`:

- "user" (the grader runs as root): each submission's kernel runs as its own unused uid (no entry in
  /etc/passwd, no process running as it), owner of `work/` only, so it cannot write the grader's files,
  the other submissions' folders or anything else root owns. When that uid cannot reach the Python
  interpreter (a venv under /root or a mode-0700 temporary folder), the kernel keeps one capability,
  CAP_DAC_READ_SEARCH: it may read any file, still write none but its own ("user, read-all").
  Resource limits: address space, file size and process count (`prlimit`).
- "session" (not root): the kernel runs as the grader's own user; it could write what the grader can.
  Everything it starts is still found and ended (below), and the notebooks were read before any ran.

Ending a submission kills, until none is left: the kernel's process session, every process of its uid
("user"), every process whose environment carries the submission's marker, and every descendant of the
grader (the grader makes itself the "child subreaper", so a detached double-forked process is adopted
by the grader, not by init, and is found there).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER_VARIABLE = "LLMBOOK_GRADE_MARKER"
FIRST_UID = 61000  # sandbox uids are taken from here up: high, unnamed, unused
MEMORY_LIMIT = 12 * 2**30  # address space per kernel: torch maps far more than it touches
FILE_SIZE_LIMIT = 2**30
PROCESS_LIMIT = 512  # threads count too: torch and ipykernel start a few dozen
_PR_SET_CHILD_SUBREAPER = 36
# The only variables a kernel inherits: nothing of the grader's own (tokens, the old grade log) leaks.
_KEPT_VARIABLES = ("PATH", "LANG", "LC_ALL", "TZ", "LLMBOOK_DATA", "PYTHONPATH")
_KEPT_VARIABLES += ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")


@dataclass
class Workspace:
    """One submission's folders, the uid its kernel runs as (None: the grader's own) and its marker."""

    root: Path
    request: Path
    work: Path
    uid: int | None
    marker: str = field(default_factory=lambda: secrets.token_hex(16))
    leader: int | None = None  # the kernel's pid, leader of its own process session

    def kernel_env(self) -> dict[str, str]:
        """The kernel's whole environment: a few of the grader's variables, nothing secret, a fresh HOME."""
        env = _kept_environment()
        env.update(
            HOME=str(self.work),
            TMPDIR=str(self.work),
            USER="student",
            LOGNAME="student",
            MPLBACKEND="Agg",
            MPLCONFIGDIR=str(self.work / ".matplotlib"),
            LLMBOOK_CACHE=str(self.work / ".cache"),
            PYTHONDONTWRITEBYTECODE="1",
            **{MARKER_VARIABLE: self.marker},
        )
        return env


class Sandbox:
    """The isolation for one grading run: makes workspaces, wraps kernel commands, ends what they start."""

    def __init__(self, isolation: str, note: str, base: Path, wrapper: list[str]):
        self.isolation, self.note, self.base, self._wrapper = isolation, note, base, wrapper
        self._count = 0
        self._locks: list[int] = []  # flock'ed files holding this run's uids against other grading runs
        self._subreaper_was = False

    @classmethod
    def start(cls, python: str = sys.executable, isolation: str = "auto") -> Sandbox:
        """The strongest isolation this machine allows (probed with `python`), or "session" if asked."""
        if isolation not in ("auto", "session"):
            raise ValueError(f"isolation must be 'auto' or 'session', got {isolation!r}")
        base = Path(tempfile.mkdtemp(prefix="llmbook-grade-"))
        os.chmod(base, 0o711)  # others may pass through to their own folder, not list the others
        subreaper_was = _get_subreaper()
        _set_subreaper(True)
        if (
            isolation == "session"
            or os.geteuid() != 0
            or not shutil.which("setpriv")
            or not shutil.which("prlimit")
        ):
            why = (
                "as asked"
                if isolation == "session"
                else "not root"
                if os.geteuid() != 0
                else "no setpriv/prlimit"
            )
            note = (
                f"isolation: session ({why}): kernels run as the grader's own user and could write its "
                "files; all they start is ended after each submission"
            )
            sandbox = cls("session", note, base, [])
            sandbox._subreaper_was = subreaper_was
            return sandbox
        sandbox = cls("user", "", base, [])
        sandbox._subreaper_was = subreaper_was
        uid = sandbox._claim_uid()
        for caps in ([], ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]):
            probe = _wrapper(uid, caps) + [python, "-c", "import ipykernel, torch, llmbook.exercises"]
            env = {**_kept_environment(), "HOME": "/"}
            done = subprocess.run(probe, env=env, cwd="/", capture_output=True, timeout=300, check=False)
            if done.returncode == 0:
                read_all = " with read access to every file (the interpreter is not readable otherwise)"
                note = (
                    "isolation: user: each kernel runs as its own unprivileged uid"
                    f"{read_all if caps else ''}, "
                    "may write only its own folder, and is limited in memory, file size and processes"
                )
                sandbox.isolation, sandbox.note = ("user, read-all" if caps else "user"), note
                sandbox._wrapper = caps
                return sandbox
        note = (
            "isolation: session (an unprivileged uid cannot start the kernel's Python: "
            f"{done.stderr.decode(errors='replace').strip().splitlines()[-1:]}): kernels run as root"
        )
        sandbox.isolation, sandbox.note = "session", note
        return sandbox

    def workspace(self) -> Workspace:
        """A fresh folder pair (and uid) for the next submission."""
        self._count += 1
        root = self.base / str(self._count)
        request, work = root / "request", root / "work"
        for folder in (root, request, work):
            folder.mkdir(mode=0o755 if folder is not work else 0o700)
        uid = None
        if self.isolation != "session":
            uid = self._claim_uid()
            os.chown(work, uid, uid)
        return Workspace(root, request, work, uid)

    def kernel_argv(self, space: Workspace, python: str = sys.executable) -> list[str]:
        """The kernel's command line (a `{connection_file}` placeholder, as kernel specs have)."""
        kernel = [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        return kernel if space.uid is None else _wrapper(space.uid, self._wrapper) + kernel

    def end(self, space: Workspace) -> None:
        """Kill everything the submission started, then remove its folders."""
        self.kill(space)
        shutil.rmtree(space.root, ignore_errors=True)

    def kill(self, space: Workspace) -> None:
        """Kill everything the submission started (see the module docstring), until nothing is left."""
        for _ in range(200):
            victims = self._survivors(space)
            if not victims:
                break
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            for pid in victims:
                _reap(pid)
            time.sleep(0.02)

    def alive(self, space: Workspace) -> list[int]:
        """The processes of this submission still running (for tests and the end-of-run check)."""
        return self._survivors(space)

    def close(self) -> None:
        """Remove the base folder and give up the subreaper role if this sandbox took it."""
        shutil.rmtree(self.base, ignore_errors=True)
        _set_subreaper(self._subreaper_was)
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()

    def _claim_uid(self) -> int:
        # Unnamed, running nothing, and locked here so that two grading runs at once never share one.
        locks = Path(tempfile.gettempdir()) / "llmbook-grade-uids"
        locks.mkdir(mode=0o700, exist_ok=True)
        running = {stat[key] for _, stat in _processes() for key in ("uid", "euid")}
        for uid in range(FIRST_UID, FIRST_UID + 100_000):
            if uid in running or _named(uid):
                continue
            fd = os.open(locks / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._locks.append(fd)
            return uid
        raise RuntimeError("no unused uid left for a sandbox")

    def _survivors(self, space: Workspace) -> list[int]:
        me = os.getpid()
        parents: dict[int, int] = {}
        found: set[int] = set()
        zombies: set[int] = set()
        for pid, stat in _processes():
            parents[pid] = stat["ppid"]
            if stat["zombie"]:
                zombies.add(pid)
            if pid == me:
                continue
            if stat["zombie"]:  # already dead: reap it if it is ours, never count it
                _reap(pid)
                continue
            if space.uid is not None and space.uid in (stat["uid"], stat["euid"]):
                found.add(pid)
            elif space.leader is not None and stat["sid"] == space.leader:
                found.add(pid)
            elif _carries(pid, space.marker):
                found.add(pid)
        found |= {pid for pid in parents if pid != me and pid not in zombies and _descends(pid, me, parents)}
        return sorted(found)


def _kept_environment() -> dict[str, str]:
    env = {k: os.environ[k] for k in _KEPT_VARIABLES if k in os.environ}
    # The grader's own llmbook first, so the kernel's side of the protocol is the grader's version.
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([here, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else here
    return env


def _wrapper(uid: int, caps: list[str]) -> list[str]:
    limits = [f"--as={MEMORY_LIMIT}", f"--fsize={FILE_SIZE_LIMIT}", f"--nproc={PROCESS_LIMIT}"]
    ids = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return ["prlimit", *limits, "--", "setpriv", *ids, *caps, "--"]


def _named(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _processes():
    """(pid, {ppid, sid, uid, euid}) of every process now visible in /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
            with open(f"/proc/{entry}/status", encoding="utf-8", errors="replace") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()
        except (OSError, StopIteration):
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # the name in parentheses may hold spaces
        ids = {"ppid": int(fields[1]), "sid": int(fields[3]), "uid": int(uids[1]), "euid": int(uids[2])}
        yield int(entry), {**ids, "zombie": fields[0] == "Z"}


def _carries(pid: int, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{MARKER_VARIABLE}={marker}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def _descends(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    seen = set()
    while pid in parents and pid not in seen:
        seen.add(pid)
        pid = parents[pid]
        if pid == ancestor:
            return True
    return False


def _reap(pid: int) -> None:
    # Killed children (and adopted orphans) must be waited for, or they stay as zombies in /proc.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: its own parent reaps it
        pass


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _set_subreaper(on: bool) -> None:
    if sys.platform.startswith("linux"):
        _libc().prctl(_PR_SET_CHILD_SUBREAPER, int(bool(on)), 0, 0, 0)


def _get_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    value = ctypes.c_int(0)
    _libc().prctl(37, ctypes.byref(value), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
    return bool(value.value)

#!/usr/bin/env bash
# Build pgw.pyz, a self-contained zipapp, from the committed hash-pinned locks.
#
#   ./build.sh                 .venv (re-made only when the dev lock changes) + pgw.pyz
#   ./build.sh test            the same, then the whole test suite on TEST_WORKERS processes
#   ./build.sh test ARGS       the same, then pytest ARGS in one process (no worker start-up;
#                              -s and --pdb work): `./build.sh test -k NAME`, or add `-n 2`
#   ./build.sh bench [ARGS]    the same, then pgw vs pgworker 0.1.2 (tests/bench.py ARGS; not part of test)
#   ./build.sh repro           build HEAD in two fresh clones, compare their sha256
#   ./build.sh lock [ARGS]     re-resolve the locks with uv (ARGS go to uv, e.g. --upgrade)
#
# The normal build uses only pip and the locks: `--require-hashes --only-binary :all:`.
set -euo pipefail
cd "$(dirname "$0")"
umask 022 # file modes go into the zip: keep them the same for every builder

PYTHON=${PYTHON:-python3} # makes .venv; the pyz itself runs on any Python >= 3.10
VENV=.venv
# The whole suite's pytest-xdist workers. The tests go out one at a time, longest first
# (tests/conftest.py), so the 200 MiB test (3.5 min, mostly waiting on its 1 MB/s proxy)
# starts at once. Measured on 2 cores, from a fresh clone: 2 workers 354 s, 3 workers
# 250 s, one process 10.5 min. 3 would also pass CI's 7.5 min, but puts more load beside
# the timing tests, and the 200 MiB test has lost its connection under it before.
TEST_WORKERS=2
# -qq: hush warnings about this machine's pip config; errors still show.
PIP_FLAGS=(-qq --disable-pip-version-check --require-hashes --only-binary :all:)

# Make .venv if missing or if the dev lock (or the Python) changed since it was made.
ensure_venv() {
  local stamp
  stamp="$(sha256sum requirements-dev.lock | cut -d' ' -f1) $("$PYTHON" -c 'import sys; print(sys.version)' | head -1)"
  if [[ -x $VENV/bin/python && -f $VENV/.dev-lock-stamp && "$(cat $VENV/.dev-lock-stamp)" == "$stamp" ]]; then
    return
  fi
  echo "build.sh: making $VENV from requirements-dev.lock" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" -r requirements-dev.lock
  echo "$stamp" >"$VENV/.dev-lock-stamp" # written last: a failed install retries next time
}

# The pyz's own start code: shiv's zip runs `__main__.py` before it extracts anything and
# before any dependency is imported, so this is the one place that can tell a user on an
# old Python what to do, pick an extraction root HOME cannot give, and make the extraction
# private. It must parse on any Python 3 (no f-strings). build_pyz puts it in the zip in
# place of shiv's two-line `__main__.py`; this heredoc is its only copy.
start_code() {
  cat <<'PY'
# -*- coding: utf-8 -*-
# pgw.pyz start code (written by build.sh). Runs before shiv's bootstrap, on whatever
# Python started the pyz, so it parses on any Python 3: no f-strings, no annotations.
#   1. Older than 3.10: re-exec under the newest python3.1x on PATH that really runs;
#      none: one line saying what to install.
#   2. Where shiv unpacks: $SHIV_ROOT, else ~/.shiv, else a private per-user directory
#      under $XDG_RUNTIME_DIR or the temp directory (exported as SHIV_ROOT).
#   3. Unpack under umask 077 (dirs 0700, files 0600/0700: the zip holds no group or
#      other bits), then hand pgw the caller's umask back.
import os
import stat
import sys

# cattrs imports inspect.get_annotations, new in 3.10; the runtime lock is resolved for 3.10.
MIN_PYTHON = (3, 10)
# Newest first: the re-exec takes the first that runs and is new enough.
NEWER_PYTHONS = ("python3.13", "python3.12", "python3.11", "python3.10")
# Set across the re-exec so the second process never looks again: no exec loop.
REEXEC_MARKER = "PGW_PYZ_REEXEC"
# A candidate that cannot print its version in this long is taken as broken; a pyenv
# shim takes about 0.1 s, a cold interpreter on a slow disk a few seconds.
PROBE_TIMEOUT_S = 10
# Anyone who can write into the extraction root can plant code the next pgw runs.
OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def fail(message):
    sys.stderr.write(message + "\n")
    sys.exit(1)


# `run` obeys these from pgw's first line on (SIGHUP: ignored), but pgw sets its
# handlers only once its imports are done: blocked from main() on, they wait for
# them. Any other command takes them back as it starts, and so does any other entry
# point (SHIV_INTERPRETER, SHIV_ENTRY_POINT); an unpacking, which may wait on another
# pgw's, lets them through.
HELD_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP")


def signals(how):
    import signal
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(getattr(signal, how), [getattr(signal, name) for name in HELD_SIGNALS])


##############################################################################
# 1. A Python new enough
##############################################################################


def probe(candidate):
    """The interpreter behind `candidate` (a pyenv shim may refuse to run) if it is new enough."""
    import signal
    import subprocess
    code = "import sys; print('%d.%d' % sys.version_info[:2]); print(sys.executable)"
    try:
        with open(os.devnull, "r+") as devnull:  # Python 2 has no subprocess.DEVNULL, nor a timeout
            # A session of its own (no threads here, so preexec_fn is safe): one that
            # hangs is killed with whatever it started, not left running under init.
            process = subprocess.Popen(
                [candidate, "-c", code], stdin=devnull, stdout=subprocess.PIPE, stderr=devnull,
                universal_newlines=True, preexec_fn=os.setsid,
            )
            try:
                output = process.communicate(**({"timeout": PROBE_TIMEOUT_S} if sys.version_info >= (3, 3) else {}))[0]
            except BaseException:
                try:  # a Ctrl-C may have come after communicate() reaped it
                    os.killpg(process.pid, signal.SIGKILL)
                except OSError:
                    pass
                process.wait()
                raise
        if process.returncode != 0:
            return None
        major, minor = output.splitlines()[0].split(".")
        version = (int(major), int(minor))
        real = output.splitlines()[1]
    except Exception:  # any way a candidate fails to run (Python 2 has no SubprocessError)
        return None
    if version < MIN_PYTHON:
        return None
    return real if real and os.access(real, os.X_OK) else candidate


def newer_python():
    """The newest python3.1x (>= 3.10) on PATH that really runs, resolved past any shim."""
    directories = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d]
    for name in NEWER_PYTHONS:
        for directory in directories:
            candidate = os.path.join(directory, name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                real = probe(candidate)
                if real:
                    return real
    return None


def ensure_new_python():
    if sys.version_info >= MIN_PYTHON:
        os.environ.pop(REEXEC_MARKER, None)  # pgw's own children start afresh
        return
    here = sys.executable or "python3"
    pyz = sys.argv[0]
    if REEXEC_MARKER not in os.environ:
        newer = newer_python()
        if newer:
            os.environ[REEXEC_MARKER] = here
            signals("SIG_BLOCK")  # across the exec: the new interpreter's start cannot take them
            try:
                os.execv(newer, [newer, pyz] + sys.argv[1:])
            except OSError:
                signals("SIG_UNBLOCK")
    fail(
        "pgw: needs Python 3.10 or newer; %s is %s. Install python3.11 (RHEL 9: dnf install "
        "python3.11) or run: python3.11 %s" % (here, "%d.%d.%d" % tuple(sys.version_info[:3]), pyz)
    )


##############################################################################
# 2. Where to unpack
##############################################################################


def why(error):
    return error.strerror or str(error)


def secure(path, info):
    """Whether directory `path` (stat `info`) was open to other writers, dropping their
    write bits if it is ours; None if they can write it and that is not ours to change
    (another user's directory, or a shared sticky one like /tmp)."""
    mode = stat.S_IMODE(info.st_mode)
    if not mode & OTHERS_WRITE:
        return False
    if info.st_uid != os.geteuid() or mode & stat.S_ISVTX:
        return None
    os.chmod(path, mode & ~OTHERS_WRITE)
    return True


def extraction_name():
    """The directory shiv unpacks this pyz into, in its root."""
    import json
    import zipfile
    with zipfile.ZipFile(sys.argv[0]) as archive:
        build_id = json.loads(archive.read("environment.json").decode())["build_id"]
    return "%s_%s" % (os.path.basename(os.path.realpath(sys.argv[0])), build_id)


def unpacked_in(root):
    """Whether this pyz is unpacked in `root` already: one that cannot be written
    (a read-only file system, `chattr +i`) then still serves every command."""
    try:
        return os.path.isdir(os.path.join(root, extraction_name(), "site-packages"))
    except (OSError, ValueError, KeyError):  # no zip to read it from (a test's start code alone)
        return False


def drop_untrusted_extraction(root):
    """Others could write into `root` until now: remove this build's extraction, its
    half-done `.tmp` and its lock (a planted symlink there would be truncated)."""
    import shutil
    name = extraction_name()
    for path in (os.path.join(root, name), os.path.join(root, name + ".tmp"), os.path.join(root, "." + name + "_lock")):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        except OSError as error:
            fail("pgw: %s was writable by other users and cannot be removed (%s): remove it, "
                 "or set SHIV_ROOT to a directory only you can write" % (path, why(error)))


def configured_root(value):
    """$SHIV_ROOT, as shiv reads it: made if missing; refused if others can write it."""
    path = os.path.expanduser(os.environ.get(value[1:], value[1:]) if value.startswith("$") else value)
    try:
        os.makedirs(path, 0o700, exist_ok=True)
        loose = secure(path, os.stat(path))
    except OSError as error:
        fail("pgw: cannot unpack pgw.pyz into SHIV_ROOT=%s (%s): set SHIV_ROOT to a directory "
             "you can write" % (value, why(error)))
    if loose is None:
        fail("pgw: SHIV_ROOT=%s is writable by other users and not yours to change: set "
             "SHIV_ROOT to a directory only you can write" % value)
    if not os.access(path, os.W_OK | os.X_OK) and not unpacked_in(path):
        fail("pgw: cannot unpack pgw.pyz into SHIV_ROOT=%s (not writable): set SHIV_ROOT to a "
             "directory you can write" % value)
    if loose:
        drop_untrusted_extraction(path)


def home_root():
    """~/.shiv if it is ours (or we can make it) and writable; (None, why) if not."""
    path = os.path.expanduser(os.path.join("~", ".shiv"))
    if path.startswith("~"):
        return None, "~/.shiv: no home directory"
    try:
        try:
            os.mkdir(path, 0o700)  # the home itself must exist: never made here
        except FileExistsError:
            pass
        info = os.stat(path)  # a symlinked ~/.shiv is the user's own choice
        if not stat.S_ISDIR(info.st_mode):
            return None, "%s: not a directory" % path
        if info.st_uid != os.geteuid():
            return None, "%s: owned by uid %d, not by you" % (path, info.st_uid)
        loose = secure(path, info)
    except OSError as error:
        return None, "%s: %s" % (path, why(error))
    if loose is None:
        return None, "%s: writable by other users" % path
    if not os.access(path, os.W_OK | os.X_OK) and not unpacked_in(path):
        return None, "%s: not writable" % path
    if loose:
        drop_untrusted_extraction(path)
    return path, None


def private_root(base):
    """base/pgw-shiv-UID: a real directory of ours, mode 0700 (on a shared host another
    user could have made it first); (None, why) if not."""
    path = os.path.join(base, "pgw-shiv-%d" % os.geteuid())
    try:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(path)
    except OSError as error:
        return None, "%s: %s" % (path, why(error))
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        return None, "%s: a symlink or not a directory (refused)" % path
    if info.st_uid != os.geteuid():
        return None, "%s: owned by uid %d, not by you (refused)" % (path, info.st_uid)
    if stat.S_IMODE(info.st_mode) != 0o700:
        return None, "%s: mode %04o, not 0700 (refused): chmod 700 it, if it is yours to trust" % (
            path, stat.S_IMODE(info.st_mode))
    if not os.access(path, os.W_OK | os.X_OK):
        return None, "%s: not writable" % path
    return path, None


def choose_root():
    if os.environ.get("SHIV_ROOT"):
        configured_root(os.environ["SHIV_ROOT"])
        return
    path, reason = home_root()
    if path:
        return  # shiv's own default: nothing to tell it
    reasons = [reason]
    bases = []
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and os.path.isdir(runtime):
        bases.append(runtime)
    try:
        import tempfile
        bases.append(tempfile.gettempdir())
    except OSError as error:
        reasons.append("no temp directory (%s)" % why(error))
    for base in bases:
        path, reason = private_root(base)
        if path:
            os.environ["SHIV_ROOT"] = path  # shiv's bootstrap and pgw read it from here
            return
        reasons.append(reason)
    fail("pgw: cannot unpack pgw.pyz: %s; set SHIV_ROOT to a directory you can write" % "; ".join(reasons))


##############################################################################
# 3. Hand over to shiv, privately
##############################################################################


# The extraction's in-use lock (pgw.py's hold_extraction), taken here, before shiv looks
# for the extraction: another build's `pgw run` prunes what no pgw holds, and pgw's own
# hold comes only once its imports are done. Kept open for the process's life.
HELD = []


def hold(path):
    """A shared flock on `path` (made if missing), retaken when a prune removed the file
    between the open and the lock; an fd, or None where there is no flock."""
    try:
        import fcntl
    except ImportError:
        return None
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:  # a file system without flock
            os.close(fd)
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except OSError:
            pass  # removed: the prune that held it went first
        os.close(fd)


def bootstrap(callers_umask):
    """shiv's bootstrap() with five of its module functions wrapped (shiv is pinned by
    the dev lock; build.sh and tests/test_pyz.py check the names): the extraction is
    held before shiv looks for it, an extraction failure becomes one line, and whatever
    it hands over to (pgw's entry point, or the SHIV_INTERPRETER) runs under the caller's
    umask again, so pgw's own children are unaffected. Imports stay under 077, so the
    __pycache__ they write is private too."""
    import _bootstrap
    cache_path = _bootstrap.cache_path
    extract = _bootstrap.extract_site_packages
    run = _bootstrap.run
    execute_interpreter = _bootstrap.execute_interpreter
    prepend_pythonpath = _bootstrap.prepend_pythonpath
    site_packages = []

    def held_cache_path(archive, root_dir, build_id):
        path = cache_path(archive, root_dir, build_id)
        HELD.append(hold(os.path.join(str(path.parent), ".%s_in_use" % path.name)))
        site_packages.append(os.path.abspath(os.path.join(str(path), "site-packages")))
        return path

    def own_packages_first(env):
        # shiv puts the pyz's packages before the first site-packages, and so after
        # what PYTHONPATH names: an older attrs there broke pgw with a traceback. They
        # go right after the pyz itself; pgw's children still get PYTHONPATH.
        prepend_pythonpath(env)
        if os.environ.get("PYTHONPATH") and site_packages and site_packages[-1] in sys.path:
            sys.path.remove(site_packages[-1])
            sys.path.insert(1, site_packages[-1])

    def extract_site_packages(archive, target_path, *args, **kwargs):
        signals("SIG_UNBLOCK")  # it may wait for another pgw's unpacking as long as that takes
        try:
            return extract(archive, target_path, *args, **kwargs)
        except OSError as error:
            fail("pgw: cannot unpack pgw.pyz into %s (%s): set SHIV_ROOT to a directory "
                 "you can write" % (target_path, why(error)))
        finally:
            signals("SIG_BLOCK")

    def run_with_callers_umask(module):
        os.umask(callers_umask)
        if getattr(module, "__module__", None) != "pgw":  # SHIV_ENTRY_POINT and the like
            signals("SIG_UNBLOCK")
        return run(module)

    def execute_interpreter_with_callers_umask():
        os.umask(callers_umask)
        signals("SIG_UNBLOCK")
        return execute_interpreter()

    _bootstrap.cache_path = held_cache_path
    _bootstrap.extract_site_packages = extract_site_packages
    _bootstrap.run = run_with_callers_umask
    _bootstrap.execute_interpreter = execute_interpreter_with_callers_umask
    _bootstrap.prepend_pythonpath = own_packages_first
    _bootstrap.bootstrap()


def open_missing_stdio():
    """/dev/null where standard input, output or error is closed (`pgw.pyz run >&-`
    from a script): the next file opened would take the number, and pgw's
    "standard output" would be that file."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = os.fdopen(2, "w")


def main():
    open_missing_stdio()
    ensure_new_python()  # before the block: a Ctrl-C still ends a candidate's probe
    signals("SIG_BLOCK")
    callers_umask = os.umask(0o077)
    choose_root()
    bootstrap(callers_umask)


try:
    main()
except KeyboardInterrupt:  # Ctrl-C before pgw's own main took over: while unpacking or importing
    sys.stderr.write("pgw: interrupted\n")
    sys.exit(130)
PY
}

# Stage the runtime deps plus pgw.py in build/site, zip it with shiv, then put
# our start code in the zip.
build_pyz() {
  rm -rf build/site
  mkdir -p build/site
  # The runtime lock has no environment markers (resolved for Python 3.10), so every
  # line installs whatever Python runs pip: exceptiongroup too, which 3.10 needs.
  # --target + copying pgw.py (not installing it) keeps the checkout path out of
  # direct_url.json; --no-compile keeps .pyc files (and their timestamps) out.
  "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" \
    --no-deps --no-compile --target build/site -r requirements.lock
  # Console scripts (idna's) get a shebang naming this checkout's .venv: drop them and
  # their RECORD lines. The pyz runs pgw:main only.
  rm -rf build/site/bin
  sed -i '/^\.\.\/\.\.\/bin\//d' build/site/*.dist-info/RECORD
  install -m 0644 pgw.py build/site/pgw.py
  chmod -R u=rwX,go=rX build/site

  # Guards: one dist-info per locked package (nothing dropped by a marker), no compiled code.
  local locked installed
  locked=$(grep -cE '^[A-Za-z0-9]' requirements.lock)
  installed=$(find build/site -maxdepth 1 -name '*.dist-info' | wc -l)
  if [[ $locked != "$installed" ]]; then
    echo "build.sh: requirements.lock pins $locked packages but $installed got installed" >&2
    exit 1
  fi
  if [[ -n "$(find build/site -name '*.so' -o -name '*.pyd' -o -name '*.pth')" ]]; then
    echo "build.sh: build/site holds compiled code or .pth files; the pyz must be pure Python" >&2
    exit 1
  fi

  # shiv --reproducible: fixed zip timestamps (SOURCE_DATE_EPOCH) and sorted entries;
  # its build_id is a sha256 of the staged files' contents and relative paths.
  local epoch
  epoch=$(git log -1 --format=%ct 2>/dev/null || echo 315532800) # commit time, else 1980-01-01
  SOURCE_DATE_EPOCH=$epoch "$VENV/bin/python" -m shiv --reproducible \
    --site-packages build/site --entry-point pgw:main --python '/usr/bin/env python3' \
    --output-file build/pgw.pyz.shiv
  start_code >build/__main__.py
  "$VENV/bin/python" - build/pgw.pyz.shiv build/__main__.py build/pgw.pyz.tmp <<'PY'
# Copy shiv's zip entry by entry, in its order and with its timestamps (so the build stays
# reproducible), with our __main__.py instead of shiv's and no group/other bits on
# site-packages: shiv's extraction chmods each file to its mode in the zip.
import sys, zipfile
shiv_pyz, main_py, out_pyz = sys.argv[1:]
with zipfile.ZipFile(shiv_pyz) as shiv_zip:
    bootstrap_source = shiv_zip.read("_bootstrap/__init__.py").decode()
for hook in ("def cache_path(", "def extract_site_packages(", "def run(", "from .interpreter import execute_interpreter",
             "def prepend_pythonpath(", "cache_path(archive, env.root, env.build_id)", "            extract_site_packages(",
             "            run(import_string(", "    execute_interpreter()", "    prepend_pythonpath(env)"):
    if hook not in bootstrap_source:  # the start code wraps these five: shiv changed under us
        sys.exit(f"build.sh: shiv's _bootstrap no longer has {hook.strip()!r}; fix start_code's bootstrap()")
with open(shiv_pyz, "rb") as shiv_file, open(out_pyz, "wb") as out_file:
    out_file.write(shiv_file.readline())  # the shebang
    with zipfile.ZipFile(shiv_file) as shiv_zip, zipfile.ZipFile(out_file, "w") as out_zip:
        for entry in shiv_zip.infolist():
            data, mode = shiv_zip.read(entry), entry.external_attr >> 16
            if entry.filename == "__main__.py":
                with open(main_py, "rb") as start_code:
                    data = start_code.read()
            elif entry.filename.startswith("site-packages/"):
                mode &= ~0o077
            copy = zipfile.ZipInfo(entry.filename, date_time=entry.date_time)
            copy.compress_type, copy.external_attr = entry.compress_type, mode << 16
            out_zip.writestr(copy, data)
PY
  chmod 0755 build/pgw.pyz.tmp
  mv build/pgw.pyz.tmp pgw.pyz
  echo "pgw.pyz: $(stat -c %s pgw.pyz) bytes, sha256 $(sha256sum pgw.pyz | cut -d' ' -f1)"
}

# Build the committed HEAD in two fresh clones, one after the other; the pyz must match.
repro() {
  local tmp clone
  tmp=$(mktemp -d)
  trap "rm -rf '$tmp'" EXIT
  for clone in a b; do
    git clone --quiet . "$tmp/$clone"
    (cd "$tmp/$clone" && ./build.sh)
  done
  sha256sum "$tmp"/[ab]/pgw.pyz
  if ! cmp -s "$tmp/a/pgw.pyz" "$tmp/b/pgw.pyz"; then
    echo "build.sh repro: the two builds differ" >&2
    exit 1
  fi
  echo "build.sh repro: identical (only committed files were built)"
}

# Re-resolve both locks with uv from a throwaway venv outside the repo. The runtime lock
# is resolved for Python 3.10 on Linux (its superset: no markers); the dev lock is
# universal (3.10-3.13) and constrained to the runtime pins.
lock() {
  local tmp
  tmp=$(mktemp -d)
  trap "rm -rf '$tmp'" EXIT
  "$PYTHON" -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check uv==0.13.8
  export UV_PYTHON_DOWNLOADS=never UV_NO_CONFIG=1
  local uv=("$tmp/venv/bin/uv" pip compile --quiet --generate-hashes --only-binary :all:
    --python-version 3.10 --custom-compile-command './build.sh lock')
  "${uv[@]}" --python-platform x86_64-unknown-linux-gnu "$@" requirements.in -o requirements.lock
  "${uv[@]}" --universal -c requirements.lock "$@" requirements-dev.in -o requirements-dev.lock
  if grep -qE '^[A-Za-z0-9].*;' requirements.lock; then
    echo "build.sh lock: requirements.lock has environment markers; the pyz would miss packages" >&2
    exit 1
  fi
}

# Plain statements, not `a && b`: bash ignores `set -e` inside a function called from `&&`.
case "${1:-}" in
  "") ensure_venv; build_pyz ;;
  test)
    shift; ensure_venv; build_pyz
    # --dist loadgroup (no test names a group): one test at a time, in collection order.
    # It does nothing without -n, so ARGS can still ask for workers.
    if [[ $# == 0 ]]; then set -- -n "$TEST_WORKERS"; fi
    exec "$VENV/bin/python" -m pytest --dist loadgroup "$@" ;;
  bench) shift; ensure_venv; build_pyz; PGW_BENCH_COMMAND="./build.sh bench $*" exec "$VENV/bin/python" tests/bench.py "$@" ;;
  repro) repro ;;
  lock) shift; lock "$@" ;;
  *) echo "usage: ./build.sh [test [PYTEST ARGS] | bench [BENCH ARGS] | repro | lock [UV ARGS]]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Build pgw.pyz, a self-contained zipapp, from the committed hash-pinned locks.
#
#   ./build.sh                 .venv (re-made only when the dev lock changes) + pgw.pyz
#   ./build.sh test [ARGS]     the same, then the whole test suite (ARGS go to pytest)
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

# Stage the runtime deps plus pgw.py in build/site, then zip it with shiv.
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
    --output-file build/pgw.pyz.tmp
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
  test) shift; ensure_venv; build_pyz; exec "$VENV/bin/python" -m pytest "$@" ;;
  bench) shift; ensure_venv; build_pyz; PGW_BENCH_COMMAND="./build.sh bench $*" exec "$VENV/bin/python" tests/bench.py "$@" ;;
  repro) repro ;;
  lock) shift; lock "$@" ;;
  *) echo "usage: ./build.sh [test [PYTEST ARGS] | bench [BENCH ARGS] | repro | lock [UV ARGS]]" >&2; exit 2 ;;
esac

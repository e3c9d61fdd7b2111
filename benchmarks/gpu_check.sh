#!/usr/bin/env bash
# The GPU check, one command on the lent GPU machine (no network):  bash benchmarks/gpu_check.sh
# Installs the wheels from benchmarks/wheels/ that this Python cannot import (into runs/gpu-site,
# never into the system), then runs benchmarks/gpu_check.py (tests, timed paper11 slice,
# throughput, projection; ~7.5 minutes on an H100, --budget-s 460). Extra arguments go to it,
# e.g. `bash benchmarks/gpu_check.sh --device cpu --quick` for the CPU dry run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the first Python that has torch
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
            PY=$candidate; break
        fi
    done
fi
[ -n "$PY" ] || { echo "gpu_check: no Python with torch found (set PYTHON=...)" >&2; exit 1; }

SITE="$PWD/runs/gpu-site"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# import name : distribution in benchmarks/wheels/requirements.txt
MODULES="yaml:PyYAML tqdm:tqdm pytest:pytest iniconfig:iniconfig packaging:packaging pluggy:pluggy
pygments:Pygments pynvml:nvidia-ml-py"
missing=()
for pair in $MODULES; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done

if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu_check: installing ${missing[*]} from benchmarks/wheels into $SITE"
    mkdir -p "$SITE"
    if ! "$PY" -m pip install --quiet --no-index --find-links benchmarks/wheels --no-deps \
            --target "$SITE" "${missing[@]}"; then
        echo "gpu_check: pip failed; unpacking the wheels instead"  # a wheel is a zip of site-packages
        "$PY" - "$SITE" "${missing[@]}" <<'EOF'
import re, sys, zipfile
from pathlib import Path
site, names = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
for name in names:
    wheel = next(w for w in Path("benchmarks/wheels").glob("*.whl") if norm(w.name.split("-")[0]) == norm(name))
    zipfile.ZipFile(wheel).extractall(site)
EOF
    fi
fi
for pair in $MODULES; do
    "$PY" -c "import ${pair%%:*}" || { echo "gpu_check: cannot import ${pair%%:*}" >&2; exit 1; }
done

exec "$PY" benchmarks/gpu_check.py "$@"

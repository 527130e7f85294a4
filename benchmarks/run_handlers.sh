#!/bin/sh
# The handler benchmark of issue 8: iocpnative with a Python handler vs an asyncio Protocol and a
# uvloop Protocol running the same transform (upper.py), side by side with ../shared/bench's
# peers.py (server pinned to core 0, echoload on core 1). The iocpnative echo server (no handler)
# runs too, as the native ceiling. Arguments go to peers.py (e.g. --rate 20000).
#
# Needs: bash ../shared/bench/build.sh (echoload, .venv with uvloop), and an iocpnative built for
# that venv's Python: IOCPNATIVE_PATH is put on PYTHONPATH (default: the installed package).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH=${BENCH:-$HERE/../../shared/bench}
BENCH_HOME=${BENCH_HOME:-$BENCH}
PY=${PY:-$BENCH_HOME/.venv/bin/python}
PP=$HERE${IOCPNATIVE_PATH:+:$IOCPNATIVE_PATH}
exec python3 "$BENCH/peers.py" --baseline uvloop_upper \
    --only iocpnative_handler,uvloop_upper,asyncio_upper,iocpnative_echo \
    --server "iocpnative_handler=env PYTHONPATH=$PP $PY -m iocpnative server --port {port} --workers 1 --handler upper:transform" \
    --server "uvloop_upper=$PY $HERE/peer_uvloop_upper.py --port {port}" \
    --server "asyncio_upper=$PY $HERE/peer_asyncio_upper.py --port {port}" \
    --server "iocpnative_echo=env PYTHONPATH=$PP $PY -m iocpnative server --port {port} --workers 1" \
    "$@"

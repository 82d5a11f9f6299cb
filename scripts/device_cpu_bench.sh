#!/usr/bin/env bash
# aiocoll's CPU collectives next to gloo and Open MPI on a many-core machine, in one go:
# for each world size, `aiocoll bench` over shm (with gloo and MPI in the same run) and over tcp
# (with gloo in the same run; SHM=0 skips shm, P2P_SIZES adds benchmarks/tcp_p2p.py).
#
# usage, from the repository root (the device tool runs commands there):
#     bash scripts/device_cpu_bench.sh                 # 2, 4 and 8 ranks, 4 B .. 256 MiB
#     NS="8" SIZES=64M,256M OPS=all_reduce,all_gather bash scripts/device_cpu_bench.sh
#     SHM=0 NS="2 4 8" SIZES=4,1M,64M P2P_SIZES=1M,64M bash scripts/device_cpu_bench.sh   # tcp only
# Needs python3 with numpy and torch (gloo), mpi4py and mpirun (Open MPI); uses the checkout
# installed into a scratch folder (no registry needed: no dependencies, no build isolation) and
# put first on PYTHONPATH. Everything goes to stdout.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
NS=${NS:-"2 4 8"}
SIZES=${SIZES:-4,64K,1M,16M,64M,256M}
OPS=${OPS:-all_reduce}
TARGET_S=${TARGET_S:-1}
MPIRUN=${MPIRUN:-"mpirun --allow-run-as-root --oversubscribe --mca pml ob1 --mca btl self,vader"}
SITE=${SITE:-/tmp/aiocoll-site}
$PY -m pip install -q --no-deps --no-build-isolation --no-index --no-compile --upgrade --target "$SITE" . >/dev/null \
    || { echo "# could not install the checkout into $SITE"; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Run from elsewhere: `python -m` puts the working directory first on sys.path, and the checkout's
# aiocoll/ (without aiocoll.transports, which only the install maps) would shadow the install.
REPO=$(pwd)
cd /tmp
export GLOO_SOCKET_IFNAME=lo

echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host $(hostname)  cores $(nproc)  $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# memory: $(free -g | awk '/Mem:/ {print $2 " GiB"}')  load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $($PY -c 'import sys, numpy, torch; print("python", sys.version.split()[0], "numpy", numpy.__version__, "torch", torch.__version__)' 2>&1 | tail -1)"
echo "# $($PY -c 'import uvloop; print("uvloop", uvloop.__version__)' 2>&1 | tail -1)"
echo "# $($PY -c 'from mpi4py import MPI; import mpi4py; print("mpi4py", mpi4py.__version__, "|", MPI.Get_library_version().splitlines()[0].strip(chr(0)))' 2>&1 | tr -d '\000' | tail -1)"
echo "# mpirun: $(command -v mpirun || echo missing)  git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"

COMPARE=gloo,mpi
if ! $PY -c 'from mpi4py import MPI' >/dev/null 2>&1 || ! command -v mpirun >/dev/null; then
    echo "# mpi4py or mpirun missing: comparing with gloo only"
    COMPARE=gloo
fi

status=0
for n in $NS; do
    if [ "${SHM:-1}" != 0 ]; then
        echo
        echo "=== aiocoll shm, n=$n, compared with $COMPARE in the same run"
        timeout 1200 $PY -m aiocoll bench -n "$n" --transport shm --op "$OPS" --sizes "$SIZES" \
            --target-s "$TARGET_S" --compare "$COMPARE" --mpirun "$MPIRUN" || status=1
    fi
    echo
    echo "=== aiocoll tcp, n=$n, compared with gloo in the same run"
    timeout 900 $PY -m aiocoll bench -n "$n" --transport tcp --op "$OPS" --sizes "$SIZES" \
        --target-s "$TARGET_S" --compare gloo || status=1
done
if [ -n "${P2P_SIZES:-}" ]; then
    echo
    echo "=== tcp point to point against a raw blocking socket (benchmarks/tcp_p2p.py)"
    timeout 300 $PY "$REPO/benchmarks/tcp_p2p.py" --sizes "$P2P_SIZES" || status=1
fi
exit $status

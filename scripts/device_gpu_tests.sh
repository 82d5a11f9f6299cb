#!/usr/bin/env bash
# aiocoll on CUDA tensors, in one go on a GPU machine: the GPU tests, then `aiocoll bench --device
# cuda` (2 and 4 ranks) next to gloo (same CUDA tensors) and NCCL (where there is a GPU per rank),
# then the staged path (no GPU-direct transport) against gloo. Fits a 10-minute call.
#
# usage, from the repository root (the device tool runs commands there), with the ucxx wheels in
# .whl (ucxx-cu13, libucxx-cu13, libucx-cu13, librmm-cu13, rmm-cu13, rapids-logger, pytest-asyncio):
#     bash scripts/device_gpu_tests.sh                  # everything
#     STAGES="bench" NS="2" SIZES=256M bash scripts/device_gpu_tests.sh
# One GPU: every rank shares it. Two or more: rank r takes GPU r mod count (issue 14's 2-GPU run
# uses this script unchanged). Logs go to $OUT (or ./gpu-logs) as well as stdout.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
NS=${NS:-"2 4"}
SIZES=${SIZES:-4,64K,1M,16M,64M,256M}
OPS=${OPS:-all_reduce,all_gather,reduce_scatter}
TARGET_S=${TARGET_S:-0.3}
STAGES=${STAGES:-"tests bench staged"}
LOGS=${OUT:-./gpu-logs}
mkdir -p "$LOGS"
# NVLink multicast stays off (the machine's rules): NCCL, PyTorch and NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export GLOO_SOCKET_IFNAME=lo PYTHONUNBUFFERED=1

SITE=${SITE:-/tmp/aiocoll-site}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/dev/null \
        || echo "# could not install the wheels in .whl"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -m pip install -q --no-deps --no-build-isolation --no-index --no-compile --upgrade --target "$SITE" . >/dev/null \
    || { echo "# could not install the checkout into $SITE"; exit 1; }
export PYTHONPATH="$SITE:$PYTHONPATH"
# The tests run from a copy without the source package beside them: the installed one (with
# aiocoll.transports) is what they and the processes they start import.
T=/tmp/aiocoll-tests
rm -rf "$T" && mkdir -p "$T" && cp -r tests examples pyproject.toml "$T"/

COMMIT=$(cat COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null)
echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host $(hostname)  cores $(nproc)  aiocoll commit $COMMIT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/# gpu: /'
(cd /tmp && $PY - <<'EOF' 2>&1 | sed 's/^/# /'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
try:
    import ucxx
    print("ucxx", ucxx.__version__, "UCX", ".".join(map(str, ucxx.get_ucx_version())))
except Exception as exc:
    print("no ucxx:", exc)
import aiocoll.transports.ucx
print("aiocoll ucx transport loads")
EOF
)
GPUS=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)

status=0
if [[ " $STAGES " == *" tests "* ]]; then
    echo; echo "=== GPU tests (pytest -m gpu) and the device-side unit tests"
    (cd "$T" && timeout 240 $PY -m pytest -p no:cacheprovider -q -m gpu -rs \
        tests/engines/test_gpu_direct.py tests/transports/test_ucx_transport.py tests/collectives/test_matrix.py tests/transports/test_transport_conformance.py \
        "tests/torch_adapter/test_torch_backend.py::test_torch_distributed_on_cuda_tensors_with_ddp" \
        tests/torch_adapter/test_torch_cuda.py 2>&1) \
        | tee "$LOGS/tests.log" | tail -n 40
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    echo; echo "=== examples/gpu_all_reduce.py, 2 ranks"
    (cd "$T" && timeout 60 $PY -m aiocoll run -n 2 examples/gpu_all_reduce.py 2>&1) | tail -n 5
fi

if [[ " $STAGES " == *" bench "* ]]; then
    for n in $NS; do
        compare=gloo
        if [ "$GPUS" -ge "$n" ]; then compare=gloo,nccl; fi
        echo; echo "=== aiocoll bench --device cuda, n=$n, GPU-direct (auto), compared with $compare in the same run"
        (cd "$T" && timeout 420 $PY -m aiocoll bench --device cuda -n "$n" --op "$OPS" --sizes "$SIZES" \
            --target-s "$TARGET_S" --compare "$compare" 2>&1) | tee "$LOGS/bench-n$n.log" || status=1
    done
fi

if [[ " $STAGES " == *" staged "* ]]; then
    echo; echo "=== staged path (AIOCOLL_GPU_TRANSPORT=off: pinned pool, no ucx), n=2, all_reduce, with gloo"
    (cd "$T" && AIOCOLL_GPU_TRANSPORT=off timeout 240 $PY -m aiocoll bench --device cuda -n 2 --op all_reduce \
        --sizes "$SIZES" --target-s "$TARGET_S" --compare gloo 2>&1) | tee "$LOGS/staged-n2.log" || status=1
    echo; echo "=== staged path over tcp (no shared-memory engine), n=2, all_reduce"
    (cd "$T" && AIOCOLL_GPU_TRANSPORT=off timeout 120 $PY -m aiocoll bench --device cuda -n 2 --op all_reduce \
        --transport tcp --sizes 4,64K,1M,64M --target-s "$TARGET_S" 2>&1) | grep -v '^# running' | tail -n 6 || status=1
    echo; echo "=== where a staged 1 MiB all_reduce spends its time (cProfile of rank 0, 20 calls)"
    cat > /tmp/aiocoll-staged-profile.py <<'EOF'
import cProfile, io, pstats, time
import torch
import aiocoll

async def main():
    pg = await aiocoll.init()
    x = torch.ones(1 << 18, device="cuda")
    out = torch.empty_like(x)
    for _ in range(5):
        await aiocoll.all_reduce(x, out=out)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(20):
        await aiocoll.all_reduce(x, out=out)
        torch.cuda.synchronize()
    prof.disable()
    dt = (time.perf_counter() - t0) / 20
    if pg.rank == 0:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(10)
        print(f"staged 1 MiB all_reduce: {dt * 1e3:.2f} ms per call")
        print("\n".join(text.getvalue().splitlines()[-16:]))
    await aiocoll.destroy()

aiocoll.run(main())
EOF
    (cd "$T" && AIOCOLL_GPU_TRANSPORT=off timeout 60 $PY -m aiocoll run -n 2 /tmp/aiocoll-staged-profile.py 2>&1) | tail -n 20
    echo; echo "=== small sizes device to device (AIOCOLL_GPU_DIRECT_MIN_BYTES=0), n=2, all_reduce"
    (cd "$T" && AIOCOLL_GPU_DIRECT_MIN_BYTES=0 timeout 120 $PY -m aiocoll bench --device cuda -n 2 --op all_reduce \
        --sizes 4,64K,256K,1M,4M --target-s "$TARGET_S" 2>&1) | tee "$LOGS/direct-small-n2.log" | tail -n 6 || status=1
fi
exit $status

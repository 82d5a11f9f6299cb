"""All-reduce of CUDA tensors, device to device: ``aiocoll run -n 2 examples/gpu_all_reduce.py``.

With ucxx installed (``pip install 'aiocoll[ucx-cu12]'`` or ``[ucx-cu13]``), ``transport="auto"``
also starts the ucx transport for payloads in device memory: tensors of at least
``AIOCOLL_GPU_DIRECT_MIN_BYTES`` (256 KiB) go GPU to GPU (cuda_ipc between processes of one host)
and are reduced on the GPU, on the caller's stream. Without ucxx they are staged through pinned
host memory. Each rank takes GPU ``rank % device_count``: ranks share a GPU when there are more
ranks than GPUs.
"""

import asyncio
import os
import time

import torch

import aiocoll


async def main() -> None:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    pg = await aiocoll.init()
    r, w = pg.rank, pg.size
    direct = all(pg.world.comm.has_device_path(p) for p in range(w) if p != r)
    x = torch.full((64 << 20,), float(r + 1), device="cuda")  # 256 MiB of float32
    y = await aiocoll.all_reduce(x)  # first call: connections and CUDA IPC mappings
    assert float(y[0]) == w * (w + 1) / 2
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        await aiocoll.all_reduce(x, out=y)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 10
    if r == 0:
        busbw = x.nbytes / dt * 2 * (w - 1) / w / 1e9
        how = "GPU-direct over ucx" if direct else "staged through host memory"
        print(f"{w} ranks, 256 MiB all_reduce: {dt * 1e3:.2f} ms, busbw {busbw:.1f} GB/s ({how})")
    await aiocoll.destroy()


if __name__ == "__main__":
    asyncio.run(main())

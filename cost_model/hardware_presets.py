"""Hardware presets: published specs, derated by stated, uniform rules (not fitted to results).

Derating rules, applied to every preset alike:

* GEMM: ``sustained = peak dense fp16 tensor-core rate x GEMM_EFFICIENCY`` (0.7; cuBLAS reaches
  70-85% of peak on large fp16 GEMMs). The T4 is the exception: it is power-capped at 70 W and
  a continuous cuBLAS fp16 4096^3 GEMM runs at ~24 TFLOPS, not 65 (NVIDIA developer forums,
  "About GPU peak performance", 2023: measured 24T, NVIDIA staff: "expected behavior ... due to
  power capping"). We use that measured 24 TFLOPS.
* Device memory: ``sustained = spec bandwidth x 0.8`` (typical STREAM-like copy efficiency).
* Link: PCIe 3.0 x16 ~ 12 GB/s, 4.0 x16 ~ 25 GB/s, 5.0 x16 ~ 50 GB/s with pinned memory
  (about 75-80% of the 15.75 / 31.5 / 63 GB/s raw rates).
* Host: ``cpu_flops = cores x GHz x fp32 FLOP/cycle x 0.5`` (AVX2 2xFMA: 32, AVX-512 2xFMA: 64;
  half of peak for torch's CPU kernels); ``cpu_mem_bytes_per_s = channels x MT/s x 8 B x 0.6``.
* ``layer_overhead_s = 2e-4``: ~20 kernel launches of ~10 us per layer from Python. The
  offloading runtime's own per-layer Python measured ~1 ms per layer-step on this project's
  CPU box (``python -m cost_model profile``), how much of it hides behind device work on a GPU
  is unmeasured; a profile measured on the GPU machine times it there. ``engine_layer_overhead_s``
  stays None (the engine is priced like the runtime) for the same reason.
* ``selection_overhead_s`` and ``selection_s_per_token`` stay 0: what a sparse step's select,
  gather and observe cost on a GPU, beyond its attention, has not been measured here (no GPU
  was lent), and how much of their ~25 launches per layer hides behind device work is not
  known from the specs. ``python -m cost_model profile`` on the GPU machine measures both.

Sources: NVIDIA data sheets (T4, V100, A100, H100, Ada/RTX 4090 whitepaper), Intel ARK / AMD
product pages for the hosts, NVIDIA DGX-1 / DGX A100 / DGX H100 user guides for the host specs,
FlexGen (Sheng et al., ICML 2023) Sec. 6 for the T4 machine: GCP, T4 16 GB, 208 GB DRAM,
Intel Xeon @ 2.00 GHz (24 cores used here, as in our brief; 6-channel DDR4-2666).
"""

from __future__ import annotations

from cost_model.hardware import HardwareProfile

GB = 10**9
GIB = 2**30
GEMM_EFFICIENCY = 0.7
MEM_EFFICIENCY = 0.8
HOST_MEM_EFFICIENCY = 0.6


def _host_bw(channels: int, mega_transfers: int) -> float:
    return channels * mega_transfers * 1e6 * 8 * HOST_MEM_EFFICIENCY


def _host_flops(cores: int, ghz: float, flop_per_cycle: int) -> float:
    return cores * ghz * 1e9 * flop_per_cycle * 0.5


# DGX-1 (V100): 2x Xeon E5-2698 v4, 20 cores each @ 2.2 GHz, AVX2; 4 ch DDR4-2400/socket; 512 GB.
_DGX1_CPU = dict(cpu_name="2x Intel Xeon E5-2698 v4 (40 cores, AVX2), 512 GB DDR4-2400",
                 cpu_mem_bytes=512 * GIB, cpu_flops_per_s=_host_flops(40, 2.2, 32),
                 cpu_mem_bytes_per_s=_host_bw(8, 2400))
# DGX A100: 2x AMD EPYC 7742, 64 cores each @ 2.25 GHz, AVX2; 8 ch DDR4-3200 per socket; 1 TB.
_DGXA100_CPU = dict(cpu_name="2x AMD EPYC 7742 (128 cores, AVX2), 1 TB DDR4-3200",
                    cpu_mem_bytes=1024 * GIB, cpu_flops_per_s=_host_flops(128, 2.25, 32),
                    cpu_mem_bytes_per_s=_host_bw(16, 3200))
# DGX H100: 2x Xeon Platinum 8480C, 56 cores each @ 2.0 GHz, AVX-512; 8 ch DDR5-4800/socket; 2 TB.
_DGXH100_CPU = dict(cpu_name="2x Intel Xeon Platinum 8480C (112 cores, AVX-512), 2 TB DDR5-4800",
                    cpu_mem_bytes=2048 * GIB, cpu_flops_per_s=_host_flops(112, 2.0, 64),
                    cpu_mem_bytes_per_s=_host_bw(16, 4800))
_PCIE3 = dict(link_name="PCIe 3.0 x16", h2d_bytes_per_s=12 * GB, d2h_bytes_per_s=12 * GB)
_PCIE4 = dict(link_name="PCIe 4.0 x16", h2d_bytes_per_s=25 * GB, d2h_bytes_per_s=25 * GB)
_PCIE5 = dict(link_name="PCIe 5.0 x16", h2d_bytes_per_s=50 * GB, d2h_bytes_per_s=50 * GB)


def _gpu(name: str, mem_gb: int, peak_tflops: float, mem_gbps: float,
         sustained_tflops: float | None = None) -> dict:
    rate = (sustained_tflops or peak_tflops * GEMM_EFFICIENCY) * 1e12
    return dict(gpu_name=name, gpu_mem_bytes=mem_gb * GIB, gpu_gemm_flops_per_s=rate,
                gpu_skinny_flops_per_s=rate, gpu_mem_bytes_per_s=mem_gbps * GB * MEM_EFFICIENCY)


def _preset(key: str, gpu: dict, host: dict, link: dict) -> HardwareProfile:
    return HardwareProfile(name=key, device_kind="cuda", **gpu, **host, **link)


HARDWARE_PRESETS: dict[str, HardwareProfile] = {
    # T4: 65 TFLOPS fp16 tensor peak, 320 GB/s GDDR6, 16 GB (T4 data sheet). Host: FlexGen's
    # GCP VM: Xeon @ 2.0 GHz (Skylake, AVX-512), 24 cores, 6 ch DDR4-2666, 208 GB DRAM.
    "t4-16g": _preset("t4-16g", _gpu("NVIDIA T4 16GB", 16, 65, 320, sustained_tflops=24),
                      dict(cpu_name="Intel Xeon @2.0GHz (24 cores, AVX-512), 208 GB DDR4-2666",
                           cpu_mem_bytes=208 * GB, cpu_flops_per_s=_host_flops(24, 2.0, 64),
                           cpu_mem_bytes_per_s=_host_bw(6, 2666)), _PCIE3),
    # V100 SXM2: 125 TFLOPS fp16 tensor, 900 GB/s HBM2 (V100 data sheet). Host: DGX-1.
    "v100-16g": _preset("v100-16g", _gpu("NVIDIA V100 SXM2 16GB", 16, 125, 900), _DGX1_CPU,
                        _PCIE3),
    "v100-32g": _preset("v100-32g", _gpu("NVIDIA V100 SXM2 32GB", 32, 125, 900), _DGX1_CPU,
                        _PCIE3),
    # A100: 312 TFLOPS fp16 dense, 1555 GB/s (40 GB) / 2039 GB/s (80 GB) (A100 data sheet).
    "a100-40g": _preset("a100-40g", _gpu("NVIDIA A100 40GB", 40, 312, 1555), _DGXA100_CPU,
                        _PCIE4),
    "a100-80g": _preset("a100-80g", _gpu("NVIDIA A100 80GB", 80, 312, 2039), _DGXA100_CPU,
                        _PCIE4),
    # H100 SXM5: 989 TFLOPS fp16 dense, 3.35 TB/s HBM3 (H100 data sheet). Host: DGX H100.
    "h100-80g": _preset("h100-80g", _gpu("NVIDIA H100 SXM 80GB", 80, 989, 3350), _DGXH100_CPU,
                        _PCIE5),
    # RTX 4090: 165 TFLOPS fp16 with fp32 accumulate (Ada whitepaper), 1008 GB/s, 24 GB.
    # Host: desktop Ryzen 9 7950X, 16 cores @ 4.5 GHz (AVX-512 on 2x256-bit: 32 FLOP/cycle),
    # 2 ch DDR5-5200, 128 GB.
    "rtx-4090": _preset("rtx-4090", _gpu("NVIDIA GeForce RTX 4090 24GB", 24, 165, 1008),
                        dict(cpu_name="AMD Ryzen 9 7950X (16 cores), 128 GB DDR5-5200",
                             cpu_mem_bytes=128 * GIB, cpu_flops_per_s=_host_flops(16, 4.5, 32),
                             cpu_mem_bytes_per_s=_host_bw(2, 5200)), _PCIE4),
}

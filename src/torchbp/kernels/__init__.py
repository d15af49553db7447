"""Optional accelerator kernels (Triton on CUDA). Nothing here imports Triton at import
time: each module imports it lazily, so that CPU-only installs never need it."""

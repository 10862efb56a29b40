# Sourced by run_gpu.sh and bench/gpu_suite.sh: XLA / CUDA settings for NVIDIA GPUs (flags exist in jaxlib 0.10's XLA;
# tests/test_launchers.py checks that the installed jaxlib knows them, since an unknown flag aborts the process).
# latency-hiding scheduler: overlap FSDP all-gathers / gradient reductions with compute;
# combine thresholds: fewer, larger collectives for the many per-layer parameters.
# (Command buffers are left at XLA's default set: naming a list replaces the default, which has more kinds.)
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true
 --xla_gpu_all_gather_combine_threshold_bytes=134217728
 --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
 --xla_gpu_all_reduce_combine_threshold_bytes=134217728"
export XLA_FLAGS=$(echo $XLA_FLAGS)  # one line
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

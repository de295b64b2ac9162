# Compiler flags for FSDP training, sourced by the launch scripts (bash arrays so each flag keeps
# its comment). Every name was checked against the installed stack (jax/jaxlib 0.10.2,
# libtpu 0.0.42.1): XLA and libtpu refuse unknown flags at start-up ("Unknown flag in
# XLA_FLAGS" / "Unknown command line flag"). Anything already in XLA_FLAGS / LIBTPU_INIT_ARGS
# is kept and comes last, so a user's own setting wins.

# ---- TPU (libtpu reads LIBTPU_INIT_ARGS) ----
tpu_flags=(
  # schedule collectives early and overlap them with compute: FSDP's per-layer all-gathers
  # (weights) and reduce-scatters (gradients) hide behind the previous/next layer's matmuls
  --xla_tpu_enable_latency_hiding_scheduler=true
  # run collectives asynchronously, fused with the computation that consumes them
  --xla_tpu_enable_async_collective_fusion=true
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
  # let one async collective span several steps of the scanned layer loop
  --xla_tpu_enable_async_collective_fusion_multiple_steps=true
  # overlap collectives with compute on the TensorCore
  --xla_tpu_overlap_compute_collective_tc=true
  # asynchronous all-gather and collective-permute (the FSDP weight gathers)
  --xla_enable_async_all_gather=true
  --xla_enable_async_collective_permute=true
  # multi-slice (mesh.slices > 1): the data-parallel gradient all-reduce crosses the DCN;
  # these let XLA split and overlap it, also for differently sized gradient buffers
  --xla_tpu_enable_data_parallel_all_reduce_opt=true
  --xla_tpu_data_parallel_opt_different_sized_ops=true
)

# ---- GPU (XLA reads XLA_FLAGS) ----
gpu_flags=(
  # overlap NCCL collectives with compute (the FSDP all-gathers / reduce-scatters per layer)
  --xla_gpu_enable_latency_hiding_scheduler=true
  # start the next scanned layer's weight all-gather and the previous layer's gradient
  # reduce-scatter inside the layer loop, so they overlap with this layer's compute
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # double-buffer the layer `scan` so the pipelined collectives have a step to hide in
  --xla_gpu_enable_while_loop_double_buffering=true
  # combine small collectives into ~128 MiB ones (fewer NCCL launches, better bandwidth)
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  # combine across dimensions too (layers' weights differ in which dim is sharded)
  --xla_gpu_enable_all_gather_combine_by_dim=false
  --xla_gpu_enable_reduce_scatter_combine_by_dim=false
  # give the collectives' stream the highest priority, so compute does not starve them
  --xla_gpu_enable_highest_priority_async_stream=true
)

export LIBTPU_INIT_ARGS="${tpu_flags[*]} ${LIBTPU_INIT_ARGS:-}"
export XLA_FLAGS_GPU="${gpu_flags[*]}"

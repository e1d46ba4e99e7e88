"""Scale-out of `build-data` and `eval` across processes, GPUs and machines on Ray.

The driver (this process) keeps everything a single-process run does: the folder lock, the
metadata, resuming and writing. Ray workers each load the model once and compute chunks of
problems (`build_data.compute_chunk`) or shards of rollouts (`evaluate.eval_jobs`); results come
back to the driver, which writes them in the same format. Rollouts are seeded per problem and
rollout, never per batch, so the output equals a single-process run's whatever the number of
workers (features up to float noise). A worker that dies is restarted and its shard retried by
Ray; the driver writes each shard once, when it arrives.
"""

from lynx_exit.scale.ray_runner import RayOptions, RayPool, require_ray

__all__ = ["RayOptions", "RayPool", "require_ray"]

"""Ray workers that load the model once and compute build-data chunks and eval shards for the driver."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any

from lynx_exit.engine import GenerationConfig
from lynx_exit.evaluate import Job, check_settings, eval_jobs
from lynx_exit.exits import MethodContext, MethodSetting
from lynx_exit.models import FeatureSpec, ModelSource
from lynx_exit.probe.build_data import BuildConfig, Chunk, ChunkResult, compute_chunk

logger = logging.getLogger(__name__)

# Test hook: a worker exits (as if killed) before its next shard once it has done this many, once per marker
# file.
EXIT_AFTER_ENV = "LYNX_EXIT_TEST_WORKER_EXIT_AFTER"
EXIT_MARKER_ENV = "LYNX_EXIT_TEST_WORKER_EXIT_MARKER"


def require_ray() -> ModuleType:
    """The `ray` module, or a clear error saying what to install."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray, an optional extra: pip install 'lynx-exit[ray]'") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    address: str | None = (
        None  # None: the running cluster if any, else a local instance; "local"; "auto"; an address
    )
    workers: int = 2
    gpus_per_worker: float | None = None  # None: 1 if the cluster has GPUs, else 0
    cpus_per_worker: int | None = (
        None  # None: this machine's cores / workers (at least 1); also the torch threads
    )
    max_retries: int = 3  # restarts of a dead worker, and retries of the shard it was running

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")


class _Worker:
    """One Ray actor: the model, loaded once, and the method context of its eval shards."""

    def __init__(self, source: ModelSource, threads: int, probe: str | None, deepconf: str | None) -> None:
        import torch

        torch.set_num_threads(threads)  # workers sharing a machine must not oversubscribe its cores
        self.lm = source.load()
        self.context = MethodContext(lm=self.lm, probe=probe, deepconf=deepconf)
        self.shards_done = 0

    def _test_exit_hook(self) -> None:
        after, marker = os.environ.get(EXIT_AFTER_ENV), os.environ.get(EXIT_MARKER_ENV)
        if after is not None and marker and self.shards_done >= int(after):
            try:
                with open(marker, "x"):
                    pass
            except FileExistsError:
                return
            os._exit(1)

    def feature_spec(self, layers: tuple[int, ...] | None) -> FeatureSpec:
        return self.lm.feature_spec(layers)

    def check_settings(self, settings: list[MethodSetting]) -> None:
        check_settings(self.context, settings)

    def build_chunk(
        self, chunk: Chunk, generation: GenerationConfig, config: BuildConfig, spec: FeatureSpec
    ) -> ChunkResult:
        self._test_exit_hook()
        result = compute_chunk(self.lm, chunk, generation, config, spec)
        self.shards_done += 1
        return result

    def eval_shard(
        self,
        setting: MethodSetting,
        jobs: list[Job],
        generation: GenerationConfig,
        rollouts: int,
        batch_size: int,
    ) -> tuple[MethodSetting, list[dict[str, Any]], float]:
        self._test_exit_hook()
        began = time.perf_counter()
        records = list(eval_jobs(self.lm, self.context, setting, jobs, generation, rollouts, batch_size))
        self.shards_done += 1
        return setting, records, time.perf_counter() - began


class RayPool:
    """`with RayPool(source, options) as pool:` workers on Ray, each with the model loaded once.

    `pool.build_runner` and `pool.eval_runner` are the `runner`s of `build_dataset` and `run_eval`.
    Ray is started here (and shut down on exit) unless it is already running in this process.
    """

    def __init__(
        self, source: ModelSource, options: RayOptions, probe: str | None = None, deepconf: str | None = None
    ) -> None:
        self.source, self.options, self.probe, self.deepconf = source, options, probe, deepconf
        self.ray = require_ray()
        self._started = False
        self._actors: list[Any] = []

    def __enter__(self) -> RayPool:
        ray = self.ray
        if not ray.is_initialized():
            ray.init(
                address=self.options.address,
                include_dashboard=False,
                configure_logging=False,
                log_to_driver=False,
            )
            self._started = True
        try:
            self._actors = self._start_workers()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_workers(self) -> list[Any]:
        ray, options = self.ray, self.options
        gpus = options.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        cpus = options.cpus_per_worker or max(1, (os.cpu_count() or 1) // options.workers)
        source = self.source
        if gpus > 0 and source.device == "cpu":
            source = ModelSource(source.name, source.dtype, "cuda", source.overrides)
        env = {k: os.environ[k] for k in (EXIT_AFTER_ENV, EXIT_MARKER_ENV) if k in os.environ}
        worker = ray.remote(_Worker).options(
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=options.max_retries,
            max_task_retries=options.max_retries,
            runtime_env={"env_vars": env} if env else None,
        )
        actors = [worker.remote(source, cpus, self.probe, self.deepconf) for _ in range(options.workers)]
        logger.info("%d Ray workers, %d CPUs and %g GPUs each", options.workers, cpus, gpus)
        return actors

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for actor in self._actors:
            self.ray.kill(actor)
        self._actors = []
        if self._started:
            self.ray.shutdown()
            self._started = False

    def _ask(self, method: str, *args: Any) -> Any:
        """One worker's answer; an error raised there is raised here as itself (not wrapped by Ray)."""
        try:
            return self.ray.get(getattr(self._running()[0], method).remote(*args))
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise

    def wait_ready(self) -> None:
        """Block until every worker has loaded the model (for timing the work alone)."""
        self.ray.get([actor.feature_spec.remote(None) for actor in self._running()])

    def feature_spec(self, layers: tuple[int, ...] | None = None) -> FeatureSpec:
        """The workers' model's feature space at `layers` (the driver need not load the model)."""
        return self._ask("feature_spec", layers)

    def check_settings(self, settings: list[MethodSetting]) -> None:
        """Build every setting (and load the probe) in a worker before any shard is sent."""
        self._ask("check_settings", settings)

    def _running(self) -> list[Any]:
        if not self._actors:
            raise RuntimeError("use the pool inside `with RayPool(...) as pool:`")
        return self._actors

    def _pool(self) -> Any:
        from ray.util import ActorPool

        return ActorPool(self._running())

    def build_runner(
        self, chunks: list[Chunk], generation: GenerationConfig, config: BuildConfig, spec: FeatureSpec
    ) -> Iterator[ChunkResult]:
        """Each chunk's result, in the chunks' order (the driver writes them as a single process would)."""
        yield from self._pool().map(
            lambda actor, chunk: actor.build_chunk.remote(chunk, generation, config, spec), chunks
        )

    def eval_runner(
        self,
        shards: list[tuple[MethodSetting, list[Job]]],
        generation: GenerationConfig,
        rollouts: int,
        batch_size: int,
    ) -> Iterator[tuple[MethodSetting, list[dict[str, Any]], float]]:
        """Each shard's records and compute seconds, as the shards finish."""
        yield from self._pool().map_unordered(
            lambda actor, shard: actor.eval_shard.remote(
                shard[0], shard[1], generation, rollouts, batch_size
            ),
            shards,
        )

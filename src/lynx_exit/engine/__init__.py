"""The decode engine: requests, one batched sampler per step, and a backend seam to the model."""

from lynx_exit.engine.backend import Backend
from lynx_exit.engine.batch import DecodeLoop
from lynx_exit.engine.config import GenerationConfig
from lynx_exit.engine.engine import Engine
from lynx_exit.engine.kv_store import KVStore, KVStoreFull
from lynx_exit.engine.legacy import LegacyBackend
from lynx_exit.engine.sampler import SamplingParams, sample
from lynx_exit.engine.store_backend import StoreBackend
from lynx_exit.engine.types import Decision, ExitPolicy, ForcedAnswer, RequestResult, Scorer, Step

RowResult = RequestResult  # the name of the batch-job era

__all__ = [
    "Backend",
    "DecodeLoop",
    "Decision",
    "Engine",
    "ExitPolicy",
    "ForcedAnswer",
    "GenerationConfig",
    "KVStore",
    "KVStoreFull",
    "RequestResult",
    "RowResult",
    "SamplingParams",
    "Scorer",
    "Step",
    "StoreBackend",
    "LegacyBackend",
    "sample",
]

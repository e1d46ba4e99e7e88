"""The decode engine: requests, one batched sampler per step, and a backend seam to the model."""

from lynx_exit.engine.backend import Backend, CacheFull
from lynx_exit.engine.batch import DecodeLoop
from lynx_exit.engine.config import EngineConfig, GenerationConfig
from lynx_exit.engine.engine import Engine
from lynx_exit.engine.kv_store import KVStore, KVStoreFull
from lynx_exit.engine.sampler import SamplingParams, sample
from lynx_exit.engine.store_backend import StoreBackend
from lynx_exit.engine.types import Decision, ExitPolicy, ForcedAnswer, RequestResult, Scorer, Step

__all__ = [
    "Backend",
    "CacheFull",
    "DecodeLoop",
    "Decision",
    "Engine",
    "EngineConfig",
    "ExitPolicy",
    "ForcedAnswer",
    "GenerationConfig",
    "KVStore",
    "KVStoreFull",
    "RequestResult",
    "SamplingParams",
    "Scorer",
    "Step",
    "StoreBackend",
    "sample",
]

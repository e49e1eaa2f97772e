"""The engine: requests and sequences, the continuous-batching scheduler, token choice, recording."""

from pagedlab.engine.engine import Engine
from pagedlab.engine.request import Request, SamplingParams
from pagedlab.engine.result import RunResult
from pagedlab.engine.scheduler import Scheduler

__all__ = ["Engine", "Request", "RunResult", "SamplingParams", "Scheduler"]

"""The one small protocol every backend speaks.

A backend module names its class `BACKEND`, and `BACKEND.from_config(cfg, setup)` builds it from the run
config and the model setup (make_backend). A backend is started once, then `generate` pulls `Request`s
from an iterator (the scheduler's: so the backend decides when it has room for more) and yields lists of
`Completion`s as they finish, in any order. It stops pulling when `stop` is set (SIGTERM) and returns;
requests it pulled but did not finish are simply not yielded: they were never journaled, so a resumed run
generates them again.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol

from engine.config.run_config import RunConfig
from engine.model.setup import ModelSetup
from engine.types import Completion, Request


class Backend(Protocol):
    name: str

    @classmethod
    def from_config(cls, cfg: RunConfig, setup: ModelSetup) -> Backend: ...

    def start(self) -> None: ...

    def generate(self, requests: Iterator[Request], stop: threading.Event) -> Iterator[list[Completion]]: ...

    def close(self) -> None: ...

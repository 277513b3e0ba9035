"""What every stage of a run reads: the config, the device, the suites, the built models.

A stage is a function of a RunContext that yields records; it never writes them itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qspec.backends.vllm_probe import Probes
from qspec.config import RunConfig
from qspec.engine.compiled import Compiled
from qspec.engine.sampling import Sampler, sampler_for
from qspec.environment import describe, versions
from qspec.keys import Finished
from qspec.measure.memory import MemoryMeter
from qspec.models.precisions import reference_precision
from qspec.models.variants import Models
from qspec.plan import Cell
from qspec.records import Invariance


@dataclass
class RunContext:
    cfg: RunConfig  # device defaults already resolved
    device: torch.device
    suites: dict[str, object]  # name -> loaded Suite
    work_dir: Path
    models: Models
    finished: Finished = field(default_factory=Finished)
    bandwidth: dict | None = None  # copy bandwidth of the device (run.json), for the roofline
    # Tests pass a function of the Cell that raises, to check one cell's fault stays its own.
    fault: Callable[[Cell], None] | None = None
    # The target variants this process works on (a Ray job's group); None: every one
    targets: tuple[str, ...] | None = None
    # (model ref, precision) -> batch-invariance figures, from the build stage (or, in a Ray
    # worker, from the build job's records)
    invariance: dict[tuple[str, str], Invariance] = field(default_factory=dict)
    # What the timing cells shared the machine with (a Ray run's concurrent workers), for
    # the hardware label of every figure; None when cells ran one at a time in one process
    concurrency: str | None = None
    # model -> its compiled steps, made on first use when the config compiles (qspec_loop.py)
    compiled_models: dict[torch.nn.Module, Compiled] = field(default_factory=dict)
    # vLLM's import probe, started at preflight (cli) and answered when the serving stage asks
    vllm_probes: Probes = field(default_factory=Probes)
    # this process's memory high-water marks (a cell's peak, a Ray worker's group peak)
    memory: MemoryMeter | None = None

    def __post_init__(self) -> None:
        if self.memory is None:
            self.memory = MemoryMeter(self.device)

    def works_on(self, target: str) -> bool:
        return self.targets is None or target in self.targets

    @property
    def reference(self) -> str:
        return reference_precision(self.cfg.target.precisions, self.device.type)

    @property
    def hardware_label(self) -> str:
        """What every figure was measured on, with what it shared the machine with."""
        label = describe(self.device)
        return f"{label}; {self.concurrency}" if self.concurrency else label

    @property
    def versions(self) -> dict:
        return versions()

    def compiled(self, model: torch.nn.Module) -> Compiled:
        if model not in self.compiled_models:
            self.compiled_models[model] = Compiled(model)
        return self.compiled_models[model]

    def sampler(self, mode: str) -> Sampler:
        s = self.cfg.sampling
        return sampler_for(mode, s.temperature, s.top_k, s.top_p)

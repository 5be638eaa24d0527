"""`Config`: the six sections as one frozen value, saved and loaded as YAML, changed by ``--set`` overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from vggdist.config.overrides import Raw, replace_checked
from vggdist.config.sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    _check,
)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _check(
            not (self.model.family != "vgg" and self.run.init == "from-shallower"),
            f"--init from-shallower is VGG's staged start from net A (§3.1); {self.model.name} trains from "
            "scratch with --init he (or continues a run with --init resume-weights)",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{'optim.lr': 0.01, 'data.scale_jitter': None, ...}: the MLflow params of a run."""
        return {f"{section}.{k}": v for section, sub in self.to_dict().items() for k, v in sub.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(json.loads(json.dumps(self.to_dict())), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Config:
        unknown = set(d) - {f.name for f in fields(Config)}
        _check(
            not unknown,
            f"unknown config sections {sorted(unknown)}; valid: {[f.name for f in fields(Config)]}",
        )
        base = Config()
        kwargs = {}
        for f in fields(Config):
            section = getattr(base, f.name)
            values = d.get(f.name) or {}
            kwargs[f.name] = replace_checked(section, f.name, values)
        return Config(**kwargs)

    @staticmethod
    def load(path: str | Path) -> Config:
        return Config.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    def override(self, assignments: list[str]) -> Config:
        """Apply `section.key=value` strings (the CLI's --set), type-checked against the field."""
        by_section: dict[str, dict[str, Any]] = {}
        for a in assignments:
            key, sep, raw = a.partition("=")
            section, dot, name = key.strip().partition(".")
            _check(bool(sep and dot), f"--set {a!r}: expected section.key=value, e.g. --set optim.lr=0.005")
            _check(
                hasattr(self, section) and dataclasses.is_dataclass(getattr(self, section)),
                f"--set {a!r}: unknown section {section!r}; valid: {[f.name for f in fields(Config)]}",
            )
            by_section.setdefault(section, {})[name] = Raw(raw.strip())
        # one replace of every section, so cross-section checks see the final values only
        sections = {s: replace_checked(getattr(self, s), s, v) for s, v in by_section.items()}
        return replace(self, **sections)

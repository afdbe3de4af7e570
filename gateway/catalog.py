"""The model versions this serving process answers for, by unit, following the supervisor's swaps."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config, ModelConfig
from gateway.guards.calibration import CalibrationError
from gateway.guards.extraction import ExtractionModel, check_extraction
from gateway.guards.guard import ModelGuard, check_guard
from gateway.registry.manifest import Manifest, load_manifest
from gateway.units import Unit

__all__ = ["ModelEntry", "ModelTable"]

log = logging.getLogger("gateway.catalog")


@dataclass(frozen=True, slots=True)
class ModelEntry:
    unit: Unit
    manifest: Manifest
    config: ModelConfig
    guard: ModelGuard | None = None
    """The version's detectors and calibration, when ``config.guard`` enables any."""
    extraction: ExtractionModel | None = None
    """The extraction monitor's view of the version, when ``config.extraction`` enables it."""


class ModelTable:
    def __init__(self, config: Config, manifests: dict[Unit, Manifest]) -> None:
        self.config = config
        self.entries: dict[Unit, ModelEntry] = {
            unit: ModelEntry(unit, manifests[unit], settings, check_guard(manifests[unit], settings.guard),
                             check_extraction(manifests[unit], settings.extraction))
            for unit, settings in config.units()
        }

    def swapped(self, key: str, manifest_folder: str | None) -> None:
        """The supervisor swapped in, added or (None) removed a served version: follow it."""
        unit = Unit.parse(key)
        base = self.config.model(unit.model)
        if manifest_folder is None:
            self.entries.pop(unit, None)
        elif base is not None:
            manifest = load_manifest(Path(manifest_folder))
            try:  # the supervisor checked it before the swap; a file changed since is refused here too
                guard = check_guard(manifest, base.guard)
                extraction = check_extraction(manifest, base.extraction)
            except CalibrationError as exc:
                log.error("%s: not following the swap: %s", key, exc)
                return
            self.entries[unit] = ModelEntry(unit, manifest, dataclasses.replace(base, version=manifest.version), guard,
                                            extraction)

    def names(self) -> list[str]:
        return sorted(u.model for u in self.entries if u.default)

    def versions(self, name: str) -> list[str]:
        """The versions served for ``name``, the default first."""
        default = self.entries.get(Unit(name))
        others = sorted(e.manifest.version for u, e in self.entries.items() if u.model == name and not u.default)
        return [default.manifest.version, *others] if default else others

    def of(self, name: str) -> list[ModelEntry]:
        """Every served unit of ``name``, the default first."""
        return sorted((e for u, e in self.entries.items() if u.model == name), key=lambda e: not e.unit.default)

    def find(self, name: str, version: str | None) -> ModelEntry | None:
        """The default unit of ``name``, or the one serving ``version`` (default or pinned)."""
        entry = self.entries.get(Unit(name))
        if version is None or (entry is not None and entry.manifest.version == version):
            return entry
        return self.entries.get(Unit(name, version))

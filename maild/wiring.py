"""What the composition root hands to the parts that read policies.toml or open the store.

The CLI commands, the doctor, the report and the daemon get one Wiring (from
maild.components) instead of importing the components themselves: who is in the build is
decided in one place, and reading a file or opening a store depends only on its argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maild import config as cfg
from maild.customers.directory import initial_index
from maild.store.base import Migrations, Store

if TYPE_CHECKING:
    from maild.doctor import DoctorCheck
    from maild.report import ReportSection


@dataclass(frozen=True)
class Wiring:
    sections: Mapping[str, cfg.SectionParser]
    customer_keys: Mapping[str, cfg.CustomerParser]
    migrations: Migrations
    doctor_checks: Sequence[DoctorCheck]
    report_sections: Sequence[ReportSection]
    preloads: Sequence[str]

    def parse(self, data: dict[str, Any], path: str = "policies.toml") -> cfg.Config:
        return cfg.parse(
            data,
            path,
            sections=self.sections,
            customer_keys=self.customer_keys,
            customer_index=initial_index,
        )

    def load(self, path: str | Path) -> cfg.Config:
        return cfg.load(
            path,
            sections=self.sections,
            customer_keys=self.customer_keys,
            customer_index=initial_index,
        )

    async def open_store(
        self,
        state: str,
        config_path: str = ".",
        *,
        migrate: bool = True,
        check: bool = False,
        init: bool = False,
    ) -> Store:
        from maild.store.backend import open_store

        return await open_store(
            state, config_path, migrations=self.migrations, migrate=migrate, check=check, init=init
        )

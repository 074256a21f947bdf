"""Typed configuration of a coordinator and its federations (YAML on disk; unknown keys refused)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rmm.bundle import MergeOptions, ModuleEntry
from rmm.errors import RMMError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def token_hash(token: str) -> str:
    """Configs store sha256(token), never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


class Site(_Strict):
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class FederationConfig(_Strict):
    """One federation (job): what the sites must hold, the budget, the quorum and the deadline."""

    id: str
    base_model: str  # every site's adapters must name this base_model_name_or_path
    modules: list[ModuleEntry]  # target modules with shapes and the largest rank allowed (p ignored)
    # How to merge, as `rmm merge` reads it: method "auto" (the default) runs the allocator in two rounds of
    # uploads (spectra, then curves); "rmm-paper" a per-position basis from moments / sketches / factors.
    merge: MergeOptions = Field(default_factory=MergeOptions)
    # Method auto only: a third round chooses among the allocator's candidate plans by what each changes in the
    # tasks' outputs, every site measuring its own tasks on its own examples (rmm site run --base --calibration);
    # only per-candidate sums leave a site.
    calibrate: bool = False
    sites: dict[str, Site]  # site id -> credentials; only these may join
    min_sites: int = 1  # quorum: the federation aggregates at the deadline if this many committed
    deadline_seconds: float = 3600.0  # from creation: aggregate with the quorum, or fail
    # rmm-paper: any of moments, sketch, factors (default moments and sketch; "factors" must be allowed
    # here for a site to opt in); auto: spectra (the default and only kind)
    upload_kinds: list[Literal["moments", "sketch", "factors", "spectra"]] | None = None
    basis_dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    # Per-site limits, refused with RESOURCE_EXHAUSTED: one site must not fill the coordinator's disk or memory.
    max_pending_bytes: int = Field(default=4 * 1024**3, ge=1)  # uploaded chunks not yet consumed by a commit
    max_tasks: int = Field(default=100_000, ge=1)  # tasks in one site's manifest

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError("federation id: letters, digits, '.', '_' or '-', at most 64")
        return v

    @model_validator(mode="after")
    def _check(self) -> "FederationConfig":
        paper = ["moments", "sketch", "factors"]
        if self.upload_kinds is None:
            self.upload_kinds = ["spectra"] if self.merge.method == "auto" else paper[:2]
        allowed = ["spectra"] if self.merge.method == "auto" else paper
        if self.calibrate and self.merge.method != "auto":
            raise ValueError(
                f"calibrate chooses among method auto's plans; this federation's method is {self.merge.method}: "
                "drop calibrate or the options that imply rmm-paper"
            )
        if not self.upload_kinds or any(k not in allowed for k in self.upload_kinds):
            raise ValueError(f"method {self.merge.method} takes upload_kinds among {allowed}, got {self.upload_kinds}")
        for site in self.sites:
            if not _ID.match(site):
                raise ValueError(f"site id {site!r}: letters, digits, '.', '_' or '-', at most 64")
        hashes = [s.token_sha256 for s in self.sites.values()]
        if len(set(hashes)) != len(hashes):
            raise ValueError("two sites share a token: give every site its own")
        if not 1 <= self.min_sites <= len(self.sites):
            raise ValueError(f"min_sites must be between 1 and the number of sites ({len(self.sites)})")
        if not self.modules:
            raise ValueError("modules must list at least one module")
        return self


class TLSConfig(_Strict):
    cert: Path  # server certificate (PEM)
    key: Path  # its private key (PEM)
    client_ca: Path | None = None  # set: mutual TLS, clients must present a certificate signed by this CA


class CoordinatorConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    state_dir: Path = Path("coordinator-state")
    tls: TLSConfig | None = None  # None only with insecure: true (development on loopback)
    insecure: bool = False
    federations: list[FederationConfig] = []

    @model_validator(mode="after")
    def _tls(self) -> "CoordinatorConfig":
        if self.tls is None and not self.insecure:
            raise ValueError(
                "TLS is required: give tls.cert and tls.key (see `rmm certs`), "
                "or insecure: true for loopback development"
            )
        return self


def load_config(file: str | Path) -> CoordinatorConfig:
    file = Path(file)
    try:
        data = yaml.safe_load(file.read_text())
        return CoordinatorConfig.model_validate(data or {})
    except OSError as e:
        raise RMMError(f"cannot read config: {e}", file=file) from None
    except yaml.YAMLError as e:
        raise RMMError(f"invalid YAML: {e}", file=file) from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        # Configs written before the options moved under `merge:` name them flat: say where they go now.
        moved = first["type"] == "extra_forbidden" and first["loc"][-1] in MergeOptions.model_fields
        hint = f"; merge options go under merge: (merge: {{{first['loc'][-1]}: ...}})" if moved else ""
        raise RMMError(f"invalid config at {where or 'top level'}: {first['msg']}{hint}", file=file) from None

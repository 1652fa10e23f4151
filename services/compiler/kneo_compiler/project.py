"""Project config ``.kneo/config.yaml``: discovery (upward from the working directory or ``KNEO_PROJECT_CONFIG``),
loading, the default environment (``KNEO_ENV``), and the effective environment policy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kneo_compiler.diagnostics import SpecProblem, diag
from kneo_compiler.loader import load
from kneo_compiler.policy import EnvironmentPolicyEnforcement

JSON = dict[str, Any]
CONFIG_RELATIVE = Path(".kneo") / "config.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServiceConfig(_Strict):
    """Where the service is."""

    default_url: str | None = None


class PathsConfig(_Strict):
    """Local state, artifact and log directories (relative to the project root)."""

    state: str = ".kneo/state"
    artifacts: str = ".kneo/artifacts"
    logs: str = ".kneo/logs"


class RuntimeDefaults(_Strict):
    """Step defaults applied where a step does not say."""

    timeout_seconds: float | None = Field(default=None, gt=0)
    max_retries: int | None = Field(default=None, ge=0, le=20)
    on_error: Literal["fail", "retry", "continue"] | None = None


class Defaults(_Strict):
    """Model, runtime and policy defaults; specs and environments override them."""

    model: JSON = Field(default_factory=dict)
    runtime: RuntimeDefaults = Field(default_factory=RuntimeDefaults)
    policy: EnvironmentPolicyEnforcement | None = None


class ProjectEnvironment(_Strict):
    """One environment: a spec overlay and the policy enforced there."""

    description: str | None = None
    overlay: JSON = Field(default_factory=dict)
    policy_enforcement: EnvironmentPolicyEnforcement | None = None


class SecretsConfig(_Strict):
    """Env-var names (never values) for provider keys and other secrets."""

    provider_env: dict[str, str] = Field(default_factory=dict)
    extra_env: dict[str, str] = Field(default_factory=dict)


class RetentionConfig(_Strict):
    """Days to keep each kind of record; unset disables pruning."""

    runs_days: int | None = Field(default=None, ge=0)
    checkpoints_days: int | None = Field(default=None, ge=0)
    queue_days: int | None = Field(default=None, ge=0)
    continuations_days: int | None = Field(default=None, ge=0)
    artifacts_days: int | None = Field(default=None, ge=0)
    logs_days: int | None = Field(default=None, ge=0)


class ProjectConfig(_Strict):
    """``.kneo/config.yaml``."""

    version: Literal["v1"] = "v1"
    name: str = "kneo-serv-project"
    owner: str | None = None
    description: str | None = None
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    default_spec: str | None = None
    default_environment: str | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    environments: dict[str, ProjectEnvironment] = Field(default_factory=dict)
    secrets: SecretsConfig = Field(default_factory=SecretsConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    def policy_for(self, environment: str | None) -> EnvironmentPolicyEnforcement | None:
        """Effective policy: the environment's ``policy_enforcement`` over ``defaults.policy``; None if neither."""
        base = self.defaults.policy
        env = self.environments.get(environment or "")
        own = env.policy_enforcement if env else None
        if own is None:
            return base
        if base is None:
            return own
        return base.model_copy(update=own.model_dump(exclude_unset=True))


def find_project_config(start: Path, environ: Mapping[str, str]) -> Path | None:
    """``KNEO_PROJECT_CONFIG`` if set, else the nearest ``.kneo/config.yaml`` at or above ``start``."""
    explicit = environ.get("KNEO_PROJECT_CONFIG")
    if explicit:
        return Path(explicit)
    for folder in (start.resolve(), *start.resolve().parents):
        if (folder / CONFIG_RELATIVE).is_file():
            return folder / CONFIG_RELATIVE
    return None


def parse_project_config(text: str | bytes) -> ProjectConfig:
    """Parse and validate project config text, or raise :class:`SpecProblem` (``E_PROJECT_CONFIG``)."""
    data, _ = load(text)
    try:
        return ProjectConfig.model_validate(data)
    except ValidationError as exc:
        raise SpecProblem(
            [
                diag("E_PROJECT_CONFIG", ".".join(str(p) for p in e["loc"]), e["msg"], "see docs/spec_reference.md")
                for e in exc.errors()
            ]
        ) from None


def load_project_config(path: Path) -> ProjectConfig:
    """Read and validate a project config file, or raise :class:`SpecProblem`."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise SpecProblem([diag("E_PROJECT_CONFIG", "", f"cannot read {path}: {exc.strerror}")]) from None
    return parse_project_config(text)


def discover_project(start: Path, environ: Mapping[str, str]) -> ProjectConfig | None:
    """The project config for ``start`` (None when there is none)."""
    path = find_project_config(start, environ)
    return load_project_config(path) if path else None


def select_environment(
    explicit: str | None, environ: Mapping[str, str], project: ProjectConfig | None = None
) -> str | None:
    """``--env`` wins, then ``KNEO_ENV``, then the project's ``default_environment``."""
    return explicit or environ.get("KNEO_ENV") or (project.default_environment if project else None) or None

"""``kneo config …``: the project config (show, init, resolve, secrets, render-spec) and service profiles
(``kneo config profile set/use/list/show/delete``).

Nothing here prints a secret: profiles show ``"api_key": "***REDACTED***"`` and whether they are ``authenticated``;
``secrets`` lists env-var references with ``present`` flags only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from kneo_client.profiles import REDACTED, ProfileError, ProfileStore
from kneo_client.remote import EXIT_FAILED, EXIT_USAGE, connection, fail, store

config_app = typer.Typer(help="Manage project config", no_args_is_help=True)
profile_app = typer.Typer(help="Manage service connection profiles", no_args_is_help=True)
config_app.add_typer(profile_app, name="profile")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
EnvOpt = Annotated[str | None, typer.Option("--env", help="Environment (default: KNEO_ENV, then the project's).")]
SpecOpt = Annotated[Path | None, typer.Option("--spec", help="Spec file (default: the project's default_spec).")]

# Provider → the variable holding its key (seeds/004 "Secret management"; the gateway's inventory uses the same).
DEFAULT_PROVIDER_ENV = {
    "openai": "OPENAI_API_KEY",
    "openai-agents": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "google": "GOOGLE_API_KEY",
    "google-adk": "GOOGLE_API_KEY",
}
SERVICE_KEY_ENV = {
    "api_key": "KNEO_SERV_API_KEY",
    "api_keys": "KNEO_SERV_API_KEYS",
    "admin_api_key": "KNEO_SERV_ADMIN_API_KEY",
    "client_api_key": "KNEO_API_KEY",
    "spec_signing_key": "KNEO_SERV_SPEC_SIGNING_KEY",
}

INIT_TEMPLATE = """\
# Project config for kneo (see `kneo config show`, `kneo config resolve`).
# Spec commands find it upward from the working directory (or via KNEO_PROJECT_CONFIG); KNEO_ENV picks the
# default environment. Policy enforcement runs after spec overlays and these defaults are applied.
version: v1
name: {name}
# With service.default_url set (e.g. {{default_url: http://127.0.0.1:8000}}), `kneo run` and `kneo runs …` use that
# service unless --service-url, --profile or KNEO_SERV_URL says otherwise.
service: {{}}
paths:
  state: .kneo/state
  artifacts: .kneo/artifacts
  logs: .kneo/logs
# default_spec: specs/agent.yaml
default_environment: dev
defaults:
  model:
    provider: dummy
  runtime:
    timeout_seconds: 120
  policy:
    blocked_diagnostic_codes: [E_UNSAFE_TOOL_IMPORT, E_UNSAFE_FUNCTION_IMPORT]
environments:
  dev:
    policy_enforcement:
      enabled: false
  staging:
    overlay:
      metadata: {{tier: staging}}
    policy_enforcement:
      require_tool_permissions: true
      blocked_diagnostic_codes: [E_UNSAFE_TOOL_IMPORT, E_UNSAFE_FUNCTION_IMPORT]
  prod:
    overlay:
      metadata: {{tier: prod}}
    policy_enforcement:
      require_tool_permissions: true
      deny_unrestricted_tools: true
      require_human_review: true
      require_guardrails: true
      blocked_diagnostic_codes: [E_UNSAFE_TOOL_IMPORT, E_UNSAFE_FUNCTION_IMPORT]
# Env-var names only, never values.
secrets:
  provider_env:
    openai: OPENAI_API_KEY
    anthropic: ANTHROPIC_API_KEY
  extra_env: {{}}
retention: {{}}
"""

INIT_README = """\
# .kneo

Project settings for the `kneo` CLI. `config.yaml` is meant to be committed (it holds env-var names, never secret
values); `state/`, `artifacts/` and `logs/` are local. Service connection profiles (URLs and API keys) live outside
the project, in `~/.kneo_serv/profiles.json` (`kneo config profile --help`).
"""


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _project() -> tuple[Any, Path | None]:
    from kneo_client.spec_cli import project_config

    return project_config()


def _project_body(project: Any) -> dict[str, Any]:
    """The config as data; values under secret-looking keys in free-form sections are redacted."""
    from kneo_events.redaction import redact

    body: dict[str, Any] = project.model_dump(mode="json")
    for section in ("defaults", "environments"):
        body[section] = redact(body[section])
    return body


def _root(config_path: Path) -> Path:
    return config_path.resolve().parent.parent


# ----------------------------------------------------------------------------- project config


@config_app.command("show")
def show_cmd(as_json: JsonOpt = False) -> None:
    """Show project config."""
    project, path = _project()
    if project is None or path is None:
        fail(
            f"no project config: no .kneo/config.yaml at or above {Path.cwd()} and KNEO_PROJECT_CONFIG is unset; "
            "create one with `kneo config init`",
            EXIT_FAILED,
        )
    body = {"path": str(path), "root": str(_root(path)), "config": _project_body(project)}
    if as_json:
        _print_json(body)
        return
    from kneo_compiler.migrate import dump_yaml

    typer.echo(f"# {path}")
    sys.stdout.write(dump_yaml(body["config"]))


@config_app.command("init")
def init_cmd(
    name: Annotated[str, typer.Option("--name", help="Project name.")] = "kneo-serv-project",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a .kneo/config.yaml project config."""
    from kneo_compiler.diagnostics import SpecProblem
    from kneo_compiler.project import parse_project_config

    folder = Path.cwd() / ".kneo"
    path = folder / "config.yaml"
    if path.exists() and not force:
        fail(f"{path} already exists; pass --force to overwrite it", EXIT_FAILED)
    # A JSON string is a valid YAML double-quoted scalar, so any name is written safely.
    text = INIT_TEMPLATE.format(name=orjson.dumps(name).decode())
    try:
        parse_project_config(text)
    except SpecProblem as exc:
        fail(f"cannot write a valid config with --name {name!r}: {exc.diagnostics[0].message}", EXIT_USAGE)
    created = []
    for sub in ("artifacts", "logs"):
        keep = folder / sub / ".gitkeep"
        if not keep.exists():
            keep.parent.mkdir(parents=True, exist_ok=True)
            keep.touch()
            created.append(str(keep))
    readme = folder / "README.md"
    if not readme.exists():
        readme.write_text(INIT_README, encoding="utf-8")
        created.append(str(readme))
    path.write_text(text, encoding="utf-8")
    created.insert(0, str(path))
    if as_json:
        _print_json({"path": str(path), "name": name, "created": created})
    else:
        typer.echo(f"wrote {path}")


def _env_source(explicit: str | None, project: Any) -> str | None:
    if explicit:
        return "--env"
    if os.environ.get("KNEO_ENV"):
        return "KNEO_ENV"
    if project is not None and project.default_environment:
        return "default_environment"
    return None


def _spec_path(explicit: Path | None, project: Any, config_path: Path | None) -> Path | None:
    if explicit is not None:
        return explicit
    if project is not None and project.default_spec and config_path is not None:
        return _root(config_path) / str(project.default_spec)
    return None


@config_app.command("resolve")
def resolve_cmd(env: EnvOpt = None, spec: SpecOpt = None, as_json: JsonOpt = False) -> None:
    """Resolve project context, including environment and overlays."""
    from kneo_compiler.project import select_environment

    project, path = _project()
    environment = select_environment(env, os.environ, project)
    declared = project.environments.get(environment or "") if project is not None else None
    policy = project.policy_for(environment) if project is not None else None
    spec_path = _spec_path(spec, project, path)
    body: dict[str, Any] = {
        "project": (
            {"name": project.name, "owner": project.owner, "path": str(path), "root": str(_root(path))}
            if project is not None and path is not None
            else None
        ),
        "environment": environment,
        "environment_source": _env_source(env, project),
        "environment_declared": declared is not None,
        "environments": sorted(project.environments) if project is not None else [],
        "overlay": _project_body(project)["environments"][environment]["overlay"] if declared else {},
        "defaults": _project_body(project)["defaults"] if project is not None else None,
        "policy_enforcement": policy.model_dump(mode="json") if policy is not None else None,
        "spec": {"path": str(spec_path), "exists": spec_path.is_file()} if spec_path is not None else None,
        "service": connection(None, None, default=None).public(),
    }
    if as_json:
        _print_json(body)
        return
    proj = body["project"]
    typer.echo(f"project      {proj['name']} ({proj['path']})" if proj else "project      (none)")
    source = f" (from {body['environment_source']})" if body["environment_source"] else ""
    undeclared = "" if body["environment_declared"] or environment is None else "  [not declared in the config]"
    typer.echo(f"environment  {environment or '(base)'}{source}{undeclared}")
    if body["overlay"]:
        typer.echo(f"overlay      {orjson.dumps(body['overlay']).decode()}")
    if policy is not None:
        typer.echo(f"policy       {orjson.dumps(body['policy_enforcement']).decode()}")
    if body["spec"]:
        typer.echo(f"spec         {body['spec']['path']}{'' if body['spec']['exists'] else '  [missing]'}")
    svc = body["service"]
    auth = "authenticated" if svc["authenticated"] else "no API key"
    typer.echo(f"service      {svc['service_url'] or '(in-process)'} (from {svc['source']}; {auth})")


def _ref(kind: str, name: str, env_var: str, environ: Mapping[str, str]) -> dict[str, Any]:
    present = bool(environ.get(env_var))
    return {"name": f"{kind}:{name}", "env_var": env_var, "present": present, "value": REDACTED if present else None}


@config_app.command("secrets")
def secrets_cmd(env: EnvOpt = None, as_json: JsonOpt = False) -> None:
    """Show configured secret references without exposing values."""
    from kneo_compiler.project import select_environment

    project, _ = _project()
    environ = os.environ
    provider_env = {**DEFAULT_PROVIDER_ENV, **(project.secrets.provider_env if project is not None else {})}
    extra_env = project.secrets.extra_env if project is not None else {}
    try:
        profiles = ProfileStore.from_env(environ).load()
    except ProfileError as exc:
        fail(str(exc), EXIT_USAGE)
    inventory: dict[str, Any] = {
        "providers": {n: _ref("provider", n, v, environ) for n, v in sorted(provider_env.items())},
        "extra": {n: _ref("extra", n, v, environ) for n, v in sorted(extra_env.items())},
        "service": {n: _ref("service", n, v, environ) for n, v in SERVICE_KEY_ENV.items()},
        "profiles": {
            name: {
                "name": f"profile:{name}",
                "env_var": p.api_key_env,
                "stored": p.api_key is not None,
                "present": p.key(environ)[0] is not None,
                "value": REDACTED if p.key(environ)[0] is not None else None,
            }
            for name, p in sorted(profiles.profiles.items())
        },
    }
    body = {"environment": select_environment(env, environ, project), "inventory": inventory}
    if as_json:
        _print_json(body)
        return
    for refs in inventory.values():
        for ref in refs.values():
            where = ref["env_var"] or ("stored in the profiles file" if ref.get("stored") else "-")
            typer.echo(f"{ref['name']:<28} {where:<28} {'present' if ref['present'] else 'missing'}")


@config_app.command("render-spec")
def render_spec_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the rendered YAML.")],
    env: EnvOpt = None,
    spec: SpecOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Render default spec plus environment overlays into one YAML file."""
    from kneo_client.spec_cli import _context, _report_problem
    from kneo_compiler.diagnostics import SpecProblem
    from kneo_compiler.spec import render_spec

    text, environment, project = _context(spec, env)
    try:
        rendered = render_spec(text, environment, project=project)
    except SpecProblem as exc:
        _report_problem(exc, as_json)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(rendered, encoding="utf-8")
    if as_json:
        _print_json({"output": str(output), "environment": environment})
    else:
        typer.echo(f"wrote {output}")


# ----------------------------------------------------------------------------- profiles


def _show_profile(view: dict[str, Any]) -> None:
    mark = "*" if view["active"] else " "
    auth = "authenticated" if view["authenticated"] else "no API key"
    where = f", key from {view['api_key_source']}" if view["api_key_source"] else ""
    typer.echo(f"{mark} {view['name']:<16} {view['service_url']}  ({auth}{where})")


@profile_app.command("set")
def profile_set_cmd(
    name: Annotated[str, typer.Argument()],
    service_url: Annotated[str, typer.Option("--service-url", help="The service's base URL.")],
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Store this API key in the profiles file (mode 0600).")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", help="Read the API key from this environment variable instead.")
    ] = None,
    activate: Annotated[bool, typer.Option("--activate/--no-activate", help="Make it the active profile.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Create or update a named service profile."""
    st = store()
    try:
        profile = st.set(name, service_url, api_key=api_key, api_key_env=api_key_env, activate=activate)
        state = st.load()
    except ProfileError as exc:
        fail(str(exc), EXIT_USAGE)
    view = profile.public(os.environ, state.active)
    if as_json:
        _print_json({**view, "path": str(st.path)})
    else:
        typer.echo(f"saved profile {name!r} in {st.path}" + (" (active)" if view["active"] else ""))


@profile_app.command("use")
def profile_use_cmd(name: Annotated[str, typer.Argument()], as_json: JsonOpt = False) -> None:
    """Set the active service profile."""
    st = store()
    try:
        profile = st.use(name)
    except ProfileError as exc:
        fail(str(exc), EXIT_USAGE)
    if as_json:
        _print_json(profile.public(os.environ, name))
    else:
        typer.echo(f"active profile: {name} ({profile.service_url})")


@profile_app.command("list")
def profile_list_cmd(as_json: JsonOpt = False) -> None:
    """List configured service profiles without exposing API keys."""
    st = store()
    try:
        state = st.load()
    except ProfileError as exc:
        fail(str(exc), EXIT_USAGE)
    views = [p.public(os.environ, state.active) for _, p in sorted(state.profiles.items())]
    if as_json:
        _print_json({"active": state.active, "profiles": views, "count": len(views), "path": str(st.path)})
        return
    if not views:
        typer.echo(f"no profiles in {st.path}; create one with `kneo config profile set NAME --service-url URL`")
    for view in views:
        _show_profile(view)


@profile_app.command("show")
def profile_show_cmd(
    name: Annotated[str | None, typer.Option("--name", help="Profile (default: the active one).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one service profile without exposing its API key."""
    st = store()
    try:
        state = st.load()
        chosen = name or state.active
        if chosen is None:
            fail("no active profile; pass --name or run `kneo config profile use NAME`", EXIT_FAILED)
        profile = st.get(chosen)
    except ProfileError as exc:
        fail(str(exc), EXIT_USAGE)
    view = profile.public(os.environ, state.active)
    if as_json:
        _print_json(view)
        return
    for key, value in view.items():
        typer.echo(f"{key:<16} {'' if value is None else value}")


@profile_app.command("delete")
def profile_delete_cmd(name: Annotated[str, typer.Argument()], as_json: JsonOpt = False) -> None:
    """Delete a service profile."""
    st = store()
    try:
        was_active = st.delete(name)
    except ProfileError as exc:
        fail(str(exc), EXIT_USAGE)
    if as_json:
        _print_json({"deleted": name, "was_active": was_active})
    else:
        typer.echo(f"deleted profile {name!r}" + (" (no profile is active now)" if was_active else ""))

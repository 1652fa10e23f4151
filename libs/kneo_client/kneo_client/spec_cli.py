"""``kneo spec …``: validate, lint, compile, resolve, migrate, policy-report, explain, schema, bundle sign/verify.

Local mode: every command calls the ``kneo_compiler`` library in-process, with the project config found upward from
the working directory (or ``KNEO_PROJECT_CONFIG``). Exit codes: 0 ok, 1 the spec has errors (lint: any warning or
error; verify: the bundle does not verify), 2 usage (missing file, bad option, no signing key).
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer

from kneo_client.profiles import Connection
from kneo_compiler.bundles import SIGNING_KEY_ENV, sign_bundle, verify_bundle
from kneo_compiler.diagnostics import Diagnostic, SpecProblem, errors_of, lint_view
from kneo_compiler.loader import MAX_SPEC_BYTES
from kneo_compiler.migrate import dump_yaml, migrate
from kneo_compiler.models import spec_json_schema
from kneo_compiler.project import ProjectConfig, find_project_config, load_project_config, select_environment
from kneo_compiler.spec import check, compile_spec, explain_spec, parse_yaml, policy_report_for, render_spec

spec_app = typer.Typer(help="Validate and compile specs", no_args_is_help=True)
bundle_app = typer.Typer(help="Sign and verify approved spec bundles", no_args_is_help=True)
spec_app.add_typer(bundle_app, name="bundle")

EXIT_OK, EXIT_DIAGNOSTICS, EXIT_USAGE = 0, 1, 2
SpecPath = Annotated[Path | None, typer.Argument(show_default=False)]
EnvOpt = Annotated[str | None, typer.Option("--env", help="Environment (default: KNEO_ENV, then the project's).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ServiceUrlOpt = Annotated[str | None, typer.Option("--service-url", help="Validate through a service.")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="Service profile name")]
KeyEnvOpt = Annotated[str, typer.Option("--key-env", help="Env var holding the signing key.")]


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"kneo spec: {message}", err=True)
    raise typer.Exit(code)


def _format(d: Diagnostic) -> str:
    where = d.path or "(spec)"
    if d.line is not None:
        where += f" (line {d.line}, column {d.column})"
    hint = f"\n    → {d.suggestion}" if d.suggestion else ""
    return f"{d.severity:<7} {d.code} {where}: {d.message}{hint}"


def print_diagnostics(diagnostics: list[Diagnostic]) -> None:
    for d in diagnostics:
        typer.echo(_format(d))


def _service(service_url: str | None, profile: str | None) -> Connection | None:
    """The service to ask instead of the local library, or None (local). Spec commands stay local unless
    ``--service-url`` or ``--profile`` is given: an active profile or a project URL alone does not send specs away."""
    if not (service_url or profile):
        return None
    from kneo_client.remote import connection

    return connection(service_url, profile)


# The SDK method behind each spec route.
_SDK_CALL = {
    "validate": "validate_spec",
    "compile": "compile_spec",
    "policy-report": "spec_policy_report",
    "explain": "explain_spec",
}


def _remote(url: Connection, route: str, text: bytes, environment: str | None) -> dict[str, Any]:
    """POST the spec to ``/v1/specs/<route>`` through the SDK and return the body; service errors end the command
    with one line (exit 3 auth, 4 not found, 5 unreachable, 1 otherwise)."""
    import asyncio

    from kneo_client.remote import with_client

    try:
        spec = text.decode("utf-8")
    except UnicodeDecodeError:
        _fail("the spec is not UTF-8 text")
    method = _SDK_CALL[route]
    body: dict[str, Any] = asyncio.run(
        with_client(url, lambda client: getattr(client, method)(spec, environment=environment))
    )
    return body


def project_config() -> tuple[ProjectConfig | None, Path | None]:
    try:
        path = find_project_config(Path.cwd(), os.environ)
        return (load_project_config(path), path) if path else (None, None)
    except SpecProblem as exc:
        print_diagnostics(exc.diagnostics)
        raise typer.Exit(EXIT_DIAGNOSTICS) from None


def _spec_path(explicit: Path | None, project: ProjectConfig | None, config_path: Path | None) -> Path:
    if explicit is not None:
        return explicit
    if project and project.default_spec and config_path:
        return config_path.parent.parent / project.default_spec
    _fail("no SPEC_PATH given and no default_spec in the project config")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")


def _max_bytes() -> int:
    try:
        return int(os.environ.get("KNEO_SERV_MAX_INLINE_SPEC_BYTES", MAX_SPEC_BYTES))
    except ValueError:
        _fail("KNEO_SERV_MAX_INLINE_SPEC_BYTES must be an integer")


def _context(spec_path: Path | None, env: str | None) -> tuple[bytes, str | None, ProjectConfig | None]:
    project, config_path = project_config()
    path = _spec_path(spec_path, project, config_path)
    return _read(path), select_environment(env, os.environ, project), project


@spec_app.command("validate")
def validate_cmd(
    spec_path: SpecPath = None,
    env: EnvOpt = None,
    as_json: JsonOpt = False,
    service_url: ServiceUrlOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Validate a spec: print every diagnostic; exit 1 if any is an error."""
    url = _service(service_url, profile)
    text, environment, project = _context(spec_path, env)
    if url:
        body = _remote(url, "validate", text, environment)
        if as_json:
            _print_json(body)
        else:
            print_diagnostics([Diagnostic.model_validate(d) for d in body["diagnostics"]])
            typer.echo("valid" if body["valid"] else "invalid")
        raise typer.Exit(EXIT_OK if body["valid"] else EXIT_DIAGNOSTICS)
    result = check(text, environment, project=project, max_bytes=_max_bytes())
    if as_json:
        spec = result.spec
        _print_json(
            {
                "valid": result.valid,
                "diagnostics": [d.model_dump(exclude_none=True) for d in result.diagnostics],
                "report": {
                    "agent_name": spec.agent.name if spec and spec.agent else None,
                    "workflow_name": spec.workflow.name if spec and spec.workflow else None,
                    "environment": environment,
                },
            }
        )
    else:
        print_diagnostics(result.diagnostics)
        typer.echo("valid" if result.valid else "invalid")
    raise typer.Exit(EXIT_OK if result.valid else EXIT_DIAGNOSTICS)


@spec_app.command("lint")
def lint_cmd(spec_path: SpecPath = None, env: EnvOpt = None, as_json: JsonOpt = False) -> None:
    """Surface validator warnings and errors. Exits 1 if any are found."""
    text, environment, project = _context(spec_path, env)
    diagnostics = check(text, environment, project=project, max_bytes=_max_bytes()).diagnostics
    view = lint_view(diagnostics)
    if as_json:
        _print_json(view)
    else:
        print_diagnostics([d for d in diagnostics if d.severity != "info"])
        typer.echo(f"{view['error_count']} error(s), {view['warning_count']} warning(s)")
    raise typer.Exit(EXIT_OK if view["clean"] else EXIT_DIAGNOSTICS)


@spec_app.command("compile")
def compile_cmd(
    spec_path: SpecPath = None,
    env: EnvOpt = None,
    as_json: JsonOpt = False,
    service_url: ServiceUrlOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Compile a spec into its executable plan (deterministic, content-hashed)."""
    url = _service(service_url, profile)
    text, environment, project = _context(spec_path, env)
    if url:
        body = _remote(url, "compile", text, environment)
        if not body["valid"]:
            _report_problem(SpecProblem([Diagnostic.model_validate(d) for d in body["diagnostics"]]), as_json)
        plan = body["plan"]
    else:
        try:
            plan = compile_spec(text, environment, project=project, runnable=False)
        except SpecProblem as exc:
            _report_problem(exc, as_json)
    if as_json:
        _print_json(plan)
    else:
        workflow = plan["workflow"]
        typer.echo(f"compiled {workflow['kind']} workflow {workflow['name']!r}: {len(plan['steps'])} step(s)")
        typer.echo(f"plan hash {plan['hash']}")
    raise typer.Exit(EXIT_OK)


def _report_problem(exc: SpecProblem, as_json: bool) -> NoReturn:
    if as_json:
        _print_json({"valid": False, "diagnostics": [d.model_dump(exclude_none=True) for d in exc.diagnostics]})
    else:
        print_diagnostics(exc.diagnostics)
    raise typer.Exit(EXIT_DIAGNOSTICS)


@spec_app.command("resolve")
def resolve_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the resolved YAML.")],
    spec_path: SpecPath = None,
    env: EnvOpt = None,
) -> None:
    """Render the spec with overlays and defaults applied into one YAML file."""
    text, environment, project = _context(spec_path, env)
    try:
        rendered = render_spec(text, environment, project=project)
    except SpecProblem as exc:
        _report_problem(exc, False)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(rendered, encoding="utf-8")
    typer.echo(f"wrote {output}")


@spec_app.command("migrate")
def migrate_cmd(
    spec_path: Annotated[Path, typer.Argument()],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the v1 spec here.")] = None,
    check_only: Annotated[bool, typer.Option("--check", help="Exit 1 if the spec needs migrating.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Migrate an older YAML spec to the current v1 shape."""
    try:
        raw = parse_yaml(_read(spec_path), _max_bytes())
    except SpecProblem as exc:
        _report_problem(exc, as_json)
    result = migrate(raw)
    body = {
        "from_version": result.from_version,
        "to_version": "v1",
        "changed": result.changed,
        "changes": [{"path": p, "message": m} for p, m in result.changes],
        "diagnostics": [d.model_dump(exclude_none=True) for d in result.diagnostics],
    }
    if result.diagnostics:
        _report_problem(SpecProblem(result.diagnostics), as_json)
    if output is not None and not check_only:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(dump_yaml(result.spec), encoding="utf-8")
        body["output"] = str(output)
    if as_json:
        _print_json(body)
    elif check_only or output is not None:
        for path, message in result.changes:
            typer.echo(f"{path}: {message}")
        typer.echo(("needs migration" if result.changed else "already v1") if check_only else f"wrote {output}")
    else:
        sys.stdout.write(dump_yaml(result.spec))
    raise typer.Exit(EXIT_DIAGNOSTICS if check_only and result.changed else EXIT_OK)


@spec_app.command("policy-report")
def policy_report_cmd(
    spec_path: SpecPath = None,
    env: EnvOpt = None,
    as_json: JsonOpt = False,
    service_url: ServiceUrlOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Generate a policy evaluation report for a spec."""
    url = _service(service_url, profile)
    text, environment, project = _context(spec_path, env)
    result = (
        _remote(url, "policy-report", text, environment)
        if url
        else policy_report_for(text, environment, project=project)
    )
    report = result["report"]
    if as_json:
        _print_json(result)
    else:
        typer.echo(f"spec {report.get('spec_name')} · environment {environment or '(base)'} · valid {result['valid']}")
        for tool in report.get("tools", []):
            typer.echo(
                f"  tool {tool['id']}: network {tool['network']}, shell {tool['shell']}, "
                f"writes {tool['filesystem_write'] or 'nothing'}, explicit permissions {tool['explicit_permissions']}"
            )
        review = report.get("human_review", {})
        typer.echo(
            f"  human review: approval required {review.get('approval_required')}, "
            f"present {review.get('approval_present')}, reviewers {review.get('reviewers')}"
        )
        print_diagnostics([Diagnostic.model_validate(d) for d in report["diagnostics"]])
    raise typer.Exit(EXIT_OK if result["valid"] else EXIT_DIAGNOSTICS)


@spec_app.command("explain")
def explain_cmd(spec_path: SpecPath = None, env: EnvOpt = None, as_json: JsonOpt = False) -> None:
    """Explain in plain sentences what the compiled plan will do."""
    text, environment, project = _context(spec_path, env)
    try:
        explanation = explain_spec(text, environment, project=project)
    except SpecProblem as exc:
        _report_problem(exc, as_json)
    if as_json:
        _print_json({"explanation": explanation})
    else:
        typer.echo(explanation)


@spec_app.command("schema")
def schema_cmd(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the JSON Schema here.")] = None,
) -> None:
    """Export the JSON Schema of spec v1 (for editors)."""
    text = orjson.dumps(spec_json_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {output}")


@bundle_app.command("sign")
def bundle_sign_cmd(
    spec_path: Annotated[Path, typer.Argument()],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the bundle.")],
    approved_by: Annotated[str, typer.Option("--approved-by", help="Who approved this spec.")],
    env: EnvOpt = None,
    key_env: KeyEnvOpt = SIGNING_KEY_ENV,
    as_json: JsonOpt = False,
) -> None:
    """Create an approved, signed spec bundle."""
    key = os.environ.get(key_env)
    if not key:
        _fail(f"no signing key: set {key_env}")
    text, environment, project = _context(spec_path, env)
    try:
        raw = parse_yaml(text, _max_bytes())
        plan = compile_spec(raw, environment, project=project, runnable=False)
    except SpecProblem as exc:
        _report_problem(exc, as_json)
    approved_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    bundle = sign_bundle(
        raw, key=key, approved_by=approved_by, environment=environment, approved_at=approved_at, plan_hash=plan["hash"]
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(bundle, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    summary = {
        "output": str(output),
        "digest": bundle["digest"],
        "environment": environment,
        "approved_by": approved_by,
    }
    if as_json:
        _print_json(summary)
    else:
        typer.echo(f"signed {output} ({bundle['digest']})")


@bundle_app.command("verify")
def bundle_verify_cmd(
    bundle_path: Annotated[Path, typer.Argument()],
    key_env: KeyEnvOpt = SIGNING_KEY_ENV,
    as_json: JsonOpt = False,
) -> None:
    """Verify an approved spec bundle digest and signature."""
    try:
        bundle = orjson.loads(_read(bundle_path))
    except orjson.JSONDecodeError:
        bundle = None
    problems = verify_bundle(bundle, os.environ.get(key_env))
    ok = not errors_of(problems)
    if as_json:
        body: dict[str, Any] = {"valid": ok, "diagnostics": [d.model_dump(exclude_none=True) for d in problems]}
        if ok:
            body.update({k: bundle[k] for k in ("spec_name", "environment", "approved_by", "approved_at", "digest")})
        _print_json(body)
    else:
        print_diagnostics(problems)
        typer.echo(f"verified: approved by {bundle['approved_by']} for {bundle['environment']}" if ok else "NOT valid")
    raise typer.Exit(EXIT_OK if ok else EXIT_DIAGNOSTICS)

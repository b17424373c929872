"""The `weft` command: run, check, demo.

Both ways to run are the public interface and stay stable as weft grows:

* ``weft run -c weft.toml``: the config file;
* ``weft run --listen 127.0.0.1:8080 --upstream 127.0.0.1:9000 [--upstream ...]``: quick mode,
  one route, round robin (like Caddy's ``reverse-proxy``).

Exit codes: 0 clean stop, 1 invalid config or startup failure (message on stderr), 2 usage.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click

from weft import config as cfgmod
from weft import control


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


def _load(
    config_path: str | None,
    listen: str | None,
    upstreams: tuple[str, ...],
    no_access_log: bool,
    instance: str | None,
    admin: str | None = None,
) -> tuple[cfgmod.Config, Callable[[], cfgmod.Config]]:
    """The config and how to load it again on reload (the file, or the same quick flags)."""
    if config_path and (listen or upstreams):
        raise click.UsageError("use either -c FILE or --listen/--upstream, not both")
    if config_path and admin:
        raise click.UsageError("--admin is for quick mode; set [admin] in the file")
    if config_path:
        if instance:
            raise click.UsageError(
                "--instance is for quick mode; set [server] instance in the file"
            )

        def load_file() -> cfgmod.Config:
            from weft.handler import load_all_middleware

            config = cfgmod.load(config_path)
            load_all_middleware(config)  # a module that cannot be imported is a config error
            return config

        return load_file(), load_file
    if not listen or not upstreams:
        raise click.UsageError("give -c FILE, or --listen HOST:PORT with at least one --upstream")

    def load_quick() -> cfgmod.Config:
        return cfgmod.quick(
            listen,
            list(upstreams),
            access_log=not no_access_log,
            instance=instance or "default",
            admin=admin,
        )

    return load_quick(), load_quick


def _pidfile(pidfile: str | None, config_path: str | None, instance: str | None) -> Path:
    """The pidfile a control command means: --pidfile, else the instance's default."""
    if pidfile:
        return Path(pidfile)
    if config_path:
        try:
            instance = cfgmod.load(config_path).instance
        except cfgmod.ConfigError as e:
            click.echo("\n".join(e.errors), err=True)
            sys.exit(1)
    return control.find_pidfile(instance or "default")


_pidfile_options = [
    click.option("--pidfile", type=click.Path(dir_okay=False), help="The supervisor's pidfile."),
    click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        help="Find the instance named in this config file.",
    ),
    click.option("--instance", help='Find this instance (default: "default").'),
]


def _with_pidfile_options(f: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_pidfile_options):
        f = option(f)
    return f


@click.group()
@click.version_option(package_name="weft")
def main() -> None:
    """weft: a reverse proxy and middleware layer."""


@main.command()
@click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Config file (TOML)."
)
@click.option("--listen", help="Quick mode: address to listen on, HOST:PORT.")
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    help="Quick mode: an upstream HOST:PORT (repeat for more; round robin).",
)
@click.option("--no-access-log", is_flag=True, help="Quick mode: no access log on stdout.")
@click.option("--instance", help='Quick mode: instance name (default "default").')
@click.option(
    "--admin",
    metavar="HOST:PORT",
    help="Quick mode: serve the admin endpoints (/metrics, /healthz, /readyz, /status) here; "
    "a loopback address.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    help="Worker processes (default: [server] workers, else one per CPU).",
)
@click.option("--pidfile", type=click.Path(dir_okay=False), help="Where to write the pid.")
@click.option(
    "--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"])
)
def run(
    config_path: str | None,
    listen: str | None,
    upstreams: tuple[str, ...],
    no_access_log: bool,
    instance: str | None,
    admin: str | None,
    workers: int | None,
    pidfile: str | None,
    log_level: str,
) -> None:
    """Run the proxy in the foreground: a supervisor and its workers.

    SIGTERM drains and stops, SIGINT/SIGQUIT stop fast, SIGHUP reloads the config, SIGTTIN /
    SIGTTOU add / remove a worker.
    """
    _setup_logging(log_level)
    from weft.supervisor import Supervisor

    try:
        config, loader = _load(config_path, listen, upstreams, no_access_log, instance, admin)
    except cfgmod.ConfigError as e:
        click.echo("\n".join(e.errors), err=True)
        sys.exit(1)
    supervisor = Supervisor(
        config, loader, workers=workers, pidfile=Path(pidfile) if pidfile else None
    )
    sys.exit(supervisor.run())


@main.command()
@_with_pidfile_options
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the new generation.",
)
def reload(
    pidfile: str | None, config_path: str | None, instance: str | None, timeout: float
) -> None:
    """Reload the config of a running weft; exit 0 once the new generation serves, 1 if the
    config is invalid or its workers failed (the old generation keeps serving)."""
    path = _pidfile(pidfile, config_path, instance)
    try:
        outcome = control.reload(path, timeout)
    except control.ControlError as e:
        click.echo(f"weft reload: {e}", err=True)
        sys.exit(1)
    if outcome.get("ok"):
        click.echo(f"weft reload: {outcome.get('message', 'ok')}")
        return
    click.echo(f"weft reload: failed:\n{outcome.get('message', '')}", err=True)
    sys.exit(1)


@main.command()
@_with_pidfile_options
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the supervisor to exit.",
)
@click.option("--fast", is_flag=True, help="Do not wait for in-flight requests (SIGQUIT).")
def stop(
    pidfile: str | None, config_path: str | None, instance: str | None, timeout: float, fast: bool
) -> None:
    """Stop a running weft (graceful drain unless --fast) and wait until it has exited."""
    path = _pidfile(pidfile, config_path, instance)
    try:
        pid = control.stop(path, timeout, fast=fast)
    except control.ControlError as e:
        click.echo(f"weft stop: {e}", err=True)
        sys.exit(1)
    click.echo(f"weft stop: pid {pid} stopped")


@main.command()
@_with_pidfile_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(
    pidfile: str | None, config_path: str | None, instance: str | None, as_json: bool
) -> None:
    """Show a running weft: its config, generation, workers (from shared memory) and
    upstream endpoints with their pool figures (from its metrics files) and, where health,
    outlier or breaker sections are set, their health, ejection and breaker (shared memory),
    and the buffer pool's use per size class (its segment)."""
    from weft.status import collect, render

    path = _pidfile(pidfile, config_path, instance)
    try:
        info = collect(path)
    except control.ControlError as e:
        click.echo(f"weft status: {e}", err=True)
        sys.exit(1)
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Config file (TOML).",
)
def check(config_path: str) -> None:
    """Validate a config file (and import its middleware); exit 0 if usable, 1 otherwise."""
    from weft.handler import load_all_middleware

    try:
        config = cfgmod.load(config_path)
        load_all_middleware(config)
    except cfgmod.ConfigError as e:
        click.echo("\n".join(e.errors), err=True)
        sys.exit(1)
    click.echo(
        f"{config_path}: ok ({len(config.listeners)} listeners, "
        f"{len(config.destinations)} destinations, {len(config.routes)} routes)"
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--ports",
    default="9001,9002,9003",
    show_default=True,
    help="Comma-separated ports, one demo upstream each.",
)
def demo(host: str, ports: str) -> None:
    """Run small demo upstream servers (for examples/demo.toml) until Ctrl-C."""
    from weft.demo import run_demo_upstreams

    try:
        port_list = [int(p) for p in ports.split(",") if p.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated port numbers, got {ports!r}") from None
    run_demo_upstreams(port_list, host)

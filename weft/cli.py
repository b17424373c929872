"""The `weft` command: run, check, demo.

Both ways to run are the public interface and stay stable as weft grows:

* ``weft run -c weft.toml``: the config file;
* ``weft run --listen 127.0.0.1:8080 --upstream 127.0.0.1:9000 [--upstream ...]``: quick mode,
  one route, round robin (like Caddy's ``reverse-proxy``).

Exit codes: 0 clean stop, 1 invalid config or startup failure (message on stderr), 2 usage.
"""

from __future__ import annotations

import logging
import sys

import click

from weft import config as cfgmod


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


def _load(
    config_path: str | None, listen: str | None, upstreams: tuple[str, ...], no_access_log: bool
) -> cfgmod.Config:
    if config_path and (listen or upstreams):
        raise click.UsageError("use either -c FILE or --listen/--upstream, not both")
    if config_path:
        return cfgmod.load(config_path)
    if not listen or not upstreams:
        raise click.UsageError("give -c FILE, or --listen HOST:PORT with at least one --upstream")
    return cfgmod.quick(listen, list(upstreams), access_log=not no_access_log)


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
@click.option(
    "--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"])
)
def run(
    config_path: str | None,
    listen: str | None,
    upstreams: tuple[str, ...],
    no_access_log: bool,
    log_level: str,
) -> None:
    """Run the proxy in the foreground until SIGTERM/SIGINT (graceful drain)."""
    _setup_logging(log_level)
    from weft.handler import load_all_middleware
    from weft.sock import bind_listener
    from weft.workers.worker import hold_stop_signals, serve

    try:
        config = _load(config_path, listen, upstreams, no_access_log)
        middleware = load_all_middleware(config)
    except cfgmod.ConfigError as e:
        click.echo("\n".join(e.errors), err=True)
        sys.exit(1)
    hold_stop_signals()
    sockets = []
    try:
        for listener in config.listeners:
            sockets.append(bind_listener(listener))
    except OSError as e:
        click.echo(f"weft: {e.strerror}", err=True)
        for s in sockets:
            s.close()
        sys.exit(1)
    log = logging.getLogger("weft")
    names = ", ".join(f"{lst.address}:{lst.port}" for lst in config.listeners)
    try:
        serve(
            sockets,
            config,
            middleware=middleware,
            on_ready=lambda: log.info("listening on %s (config %s)", names, config.source),
        )
    finally:
        for s in sockets:
            s.close()
    log.info("stopped")


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

"""The ``eventmill`` command.

- ``eventmill demo [--dsn DSN] [--events N] [--nodes K]``: an order workflow processed
  by a projection and a reactor, with live progress and a self-checking summary; with
  a DSN, in K node processes that the sources move between (``eventmill.demo``);
- ``eventmill run MODULE:ATTRIBUTE [--dsn DSN] [--mode MODE] [--node-id ID]``: run a
  node made by ``ATTRIBUTE(backend, mode=..., node_id=...)`` until SIGINT/SIGTERM;
- ``eventmill migrate --dsn DSN``: install or upgrade the schema;
- ``eventmill status --dsn DSN [--json] [--fail-on-lag N|Ns]``: leader, nodes, groups,
  sources, exact lag and warnings (``eventmill.cluster_status``); exit code 0 healthy,
  1 warnings, 2 cannot check.
- ``eventmill groups list|retire`` and ``eventmill reset``: see ``eventmill.group_commands``;
- ``eventmill parked list|retry|skip``: streams held back after a processor failed, see
  ``eventmill.parked_commands``;
- ``eventmill console --dsn DSN [--port P] [--host H]``: the operations console, a live
  web page of the cluster (needs the ``console`` extra); actions only with an operator
  token from ``$EVENTMILL_CONSOLE_TOKEN`` or ``--token-file``.

Every option also comes from an ``EVENTMILL_*`` environment variable (``--dsn``:
``EVENTMILL_DSN``). Errors (bad arguments, an unreachable database, a missing schema)
print one line on stderr and exit with a non-zero code. Behind PgBouncer in transaction
mode, ``--direct-dsn`` (``EVENTMILL_DIRECT_DSN``) names PostgreSQL itself for the
connections that need a session of their own (``PostgresBackend.connect``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import inspect
import json
import os
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from eventmill import __version__, group_commands, parked_commands
from eventmill.backends.base import Backend
from eventmill.backends.memory import InMemoryBackend
from eventmill.broker.distributed import default_node_id
from eventmill.cluster_status import (
    ClusterStatus,
    LagBound,
    describe_publisher,
    gather_cluster_status,
)
from eventmill.demo import MAX_NODE_PROCESSES, run_in_memory, run_on_postgres
from eventmill.errors import EventmillError, InvalidSettingsError
from eventmill.events import check_name, identifier_from_json
from eventmill.logs import FORMATS, LEVELS, configure_logging
from eventmill.node import EventProcessingNode, NodeMode
from eventmill.rebuilds import print_projections, projection_status

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_HEALTHY = 0
"""``eventmill status``: no warning."""
EXIT_WARNINGS = 1
"""``eventmill status``: at least one warning (printed)."""
EXIT_CANNOT_CHECK = 2
"""``eventmill status`` could not check: cannot connect, or no schema."""
EXIT_BROKEN_PIPE = 141
"""stdout was closed by its reader (128 + SIGPIPE, as a shell reports it)."""


class CommandError(Exception):
    """A problem to report in one line (never a traceback)."""


# --- demo ---------------------------------------------------------------------------


async def demo(dsn: str | None, events: int, nodes: int, schema: str | None) -> int:
    """Run the demo (see ``eventmill.demo``); return the exit code (0 when the summary
    checks out). On PostgreSQL, in a fresh schema dropped at the end."""
    if dsn is None:
        return await run_in_memory(events, nodes)
    if nodes > MAX_NODE_PROCESSES:
        raise CommandError(f"--nodes with --dsn is at most {MAX_NODE_PROCESSES}, not {nodes}")
    from eventmill.backends.postgres import PostgresBackend

    schema = schema or f"eventmill_demo_{secrets.token_hex(4)}"
    backend = await connect(dsn, schema)
    assert isinstance(backend, PostgresBackend)
    try:
        async with backend.connection() as connection:
            cursor = await connection.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)
            )
            if (await cursor.fetchone()) != (0,):
                raise CommandError(f"schema {schema!r} exists: the demo needs a new one")
    except BaseException:
        await backend.close()
        raise
    try:
        await backend.install_schema()
        return await run_on_postgres(backend, dsn, schema, events, nodes)
    finally:
        try:
            async with backend.connection() as connection:
                await connection.execute(backend.sql("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        finally:
            await backend.close()


# --- run ----------------------------------------------------------------------------


NodeFactory = Callable[..., Any]


def load_factory(target: str, app_dir: str = ".") -> NodeFactory:
    """The callable named by ``MODULE:ATTRIBUTE``, importing from ``app_dir`` first (as
    uvicorn and gunicorn do); raises CommandError."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise CommandError(f"expected MODULE:ATTRIBUTE, got {target!r}")
    folder = os.path.abspath(app_dir)
    if not os.path.isdir(folder):
        raise CommandError(f"--app-dir {app_dir!r} is not a folder")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CommandError(f"cannot import {module_name!r}: {error}") from None
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise CommandError(f"{module_name!r} has no attribute {attribute!r}") from None
    if not callable(value):
        raise CommandError(f"{target} is not callable: it must make the node")
    return value  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True, kw_only=True)
class Operations:
    """``eventmill run``'s logging and HTTP settings."""

    log_level: str = "INFO"
    log_format: str = "text"
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    ready_max_lag: LagBound | None = None


async def run(
    target: str,
    dsn: str | None,
    schema: str,
    mode: NodeMode,
    node_id: str | None,
    *,
    pool_size: int = 10,
    app_dir: str = ".",
    operations: Operations | None = None,
    direct_dsn: str | None = None,
) -> int:
    """Make the node with the factory and run it until SIGINT/SIGTERM; return 0. Its
    PostgreSQL connections carry ``application_name`` ``eventmill:<node id>``."""
    operations = operations or Operations()
    factory = load_factory(target, app_dir)
    node_id = check_name(node_id or default_node_id(), "node id")
    configure_logging(operations.log_level, operations.log_format, default_node=node_id)
    backend: Backend = (
        InMemoryBackend()
        if dsn is None
        else await connect(
            dsn,
            schema,
            pool_size=pool_size,
            application_name=f"eventmill:{node_id}",
            direct_dsn=direct_dsn,
        )
    )
    try:
        try:
            node = factory(backend, mode=mode, node_id=node_id)
            if inspect.isawaitable(node):
                node = await node
        except EventmillError:
            raise
        except Exception as error:
            raise CommandError(
                f"{target}(backend, mode=..., node_id=...) failed: {error!r}"
            ) from error
        if not isinstance(node, EventProcessingNode):
            raise CommandError(f"{target} returned {node!r:.80}, not an EventProcessingNode")
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, node.stop)
        where = (
            " in memory (no --dsn or EVENTMILL_DSN: nothing is shared with other nodes or kept)"
            if dsn is None
            else f" on schema {schema!r}"
        )
        print(f"node {node.node_id} ({node.mode.name}) running{where}; SIGINT or SIGTERM stops it")
        sys.stdout.flush()
        async with contextlib.AsyncExitStack() as stack:
            if operations.http_port is not None:
                from eventmill.http import NodeEndpoints, serving

                endpoints = NodeEndpoints(node, lag_bound=operations.ready_max_lag)
                try:
                    await stack.enter_async_context(
                        serving(endpoints, host=operations.http_host, port=operations.http_port)
                    )
                except OSError as error:
                    raise CommandError(str(error)) from None
            await node.run()
        print(f"node {node.node_id} stopped")
        return 0
    finally:
        await backend.close()


# --- migrate and status -------------------------------------------------------------


async def connect(
    dsn: str,
    schema: str,
    *,
    install: bool = False,
    pool_size: int = 4,
    application_name: str = "eventmill",
    direct_dsn: str | None = None,
) -> Backend:
    """A PostgreSQL backend (its pool over ``dsn``, its sessions over ``direct_dsn`` if
    given), with its schema installed if ``install``."""
    from eventmill.backends.postgres import PostgresBackend

    backend = await PostgresBackend.connect(
        dsn,
        schema=schema,
        max_size=pool_size,
        connect_timeout=timedelta(seconds=5),
        application_name=application_name,
        direct_dsn=direct_dsn,
    )
    if install:
        try:
            await backend.install_schema()
        except BaseException:
            await backend.close()
            raise
    return backend


async def migrate(dsn: str, schema: str, direct_dsn: str | None = None) -> int:
    """Install or upgrade the schema and repair events copied from another cluster;
    print what was done."""
    from eventmill.backends.postgres import PostgresBackend

    backend = await connect(dsn, schema, direct_dsn=direct_dsn)
    try:
        assert isinstance(backend, PostgresBackend)
        applied = await backend.install_schema()
        restamped = await backend.repair_copied_events()
    finally:
        await backend.close()
    if restamped:
        print(
            f"schema {schema!r}: restamped {restamped} events copied from another cluster"
            " (their transaction ids came from it)"
        )
    if applied:
        print(f"schema {schema!r}: applied migrations {', '.join(map(str, applied))}")
    else:
        print(f"schema {schema!r} is up to date")
    return 0


def print_status(found: ClusterStatus) -> None:
    """The status as lines: summary, leader, nodes, groups, sources, warnings."""
    live = sum(node.alive for node in found.nodes)
    print(
        f"{len(found.nodes)} nodes ({live} alive), {len(found.groups)} groups, "
        f"schema version {found.schema_version}"
    )
    if found.leader is None:
        print("leader: none")
    else:
        since = (
            "" if found.leader_since is None else f" since {found.leader_since:%Y-%m-%d %H:%M:%S%z}"
        )
        print(f"leader: {found.leader} (term {found.leader_term}{since})")
    for node in found.nodes:
        seen = (
            "" if node.seconds_since_seen is None else f", seen {node.seconds_since_seen:.1f}s ago"
        )
        state = "alive" if node.alive else "DEAD"
        print(
            f"node {node.node_id:<32} {node.mode:<11} {state}{seen}, "
            f"{len(node.subscribers)} subscribers"
        )
    for group in found.groups:
        print(
            f"group {group.group:<24} {group.live_subscribers} live subscribers, "
            f"{group.sources} sources, lag {group.lag_events} events "
            f"({group.lag_seconds:.1f}s), {group.parked_streams} parked streams"
        )
    for source in found.sources:
        holder = (
            "unheld"
            if source.subscriber_id is None
            else f"{source.subscriber_id} on {source.node_id}"
            + ("" if source.holder_alive else " (dead)")
        )
        print(
            f"    {source.group:<24} {identifier_from_json(source.source)!s:<32} "
            f"epoch {source.epoch:<4} {source.state:<9} {holder}, checkpoint "
            f"{source.checkpoint}, lag {source.lag_events} ({source.lag_seconds:.1f}s)"
        )
    holdback = found.read_holdback
    if holdback is not None:
        print(
            f"read watermark {holdback.watermark}: oldest publish in flight "
            f"{describe_publisher(holdback)}"
            + ("" if holdback.oldest is None else f", open {holdback.seconds:.1f}s")
            + f"; {holdback.events_beyond} committed events beyond it"
        )
    for warning in found.warnings:
        print(f"WARNING: {warning}")


async def status(
    dsn: str,
    schema: str,
    as_json: bool,
    lag_bound: LagBound | None = None,
    direct_dsn: str | None = None,
) -> int:
    """Print the deployment's state; return 0 when healthy, 1 with warnings."""
    backend = await connect(dsn, schema, direct_dsn=direct_dsn)
    try:
        await backend.check_schema()
        found = await gather_cluster_status(backend, lag_bound=lag_bound)
        projections = await projection_status(backend)
    finally:
        await backend.close()
    if as_json:
        print(json.dumps({**found.to_json(), "projections": projections}, indent=2))
    else:
        print_status(found)
        print_projections(projections)
    return EXIT_HEALTHY if found.healthy else EXIT_WARNINGS


# --- console ------------------------------------------------------------------------


def console_token(token_file: str | None) -> str | None:
    """The operator token: the first line of ``token_file``, else
    ``$EVENTMILL_CONSOLE_TOKEN``, else None (read-only). Raises CommandError."""
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as file:
                token = file.readline().strip()
        except OSError as error:
            raise CommandError(f"cannot read --token-file: {error.strerror}") from None
    else:
        token = os.environ.get("EVENTMILL_CONSOLE_TOKEN", "").strip()
    if token and len(token) < 16:
        raise CommandError("the operator token must have at least 16 characters")
    return token or None


async def console(
    dsn: str, schema: str, host: str, port: int, token: str | None, direct_dsn: str | None = None
) -> int:
    """Serve the console until SIGINT/SIGTERM; return 0."""
    # eventmill.console first: without the extra it raises MissingDependencyError.
    from eventmill.console import ConsoleApp  # noqa: I001

    import uvicorn

    backend = await connect(
        dsn, schema, application_name="eventmill-console", direct_dsn=direct_dsn
    )
    try:
        app = ConsoleApp(backend, token=token, title=schema)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        server = uvicorn.Server(config)
        # Our handlers, not uvicorn's (which re-raise the signal after stopping, so the
        # process would not exit 0).
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, setattr, server, "should_exit", True)
        mode = "actions enabled" if token else "read-only"
        print(f"console of schema {schema!r} on http://{host}:{port}/ ({mode})", flush=True)
        await server.serve()
        if not server.started:
            raise CommandError(f"could not serve on {host}:{port}")
        return 0
    finally:
        await backend.close()


# --- arguments ----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Reports bad arguments in one line and exits with code 2."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"eventmill: {message} (see --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _mode(text: str) -> NodeMode:
    try:
        return NodeMode[text.upper()]
    except KeyError:
        choices = ", ".join(mode.name.lower() for mode in NodeMode)
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {choices}") from None


def _from_environment(
    parser: argparse.ArgumentParser,
    option: str,
    *,
    help: str,
    default: Any = None,
    type: Callable[[str], Any] | None = None,
    **keywords: Any,
) -> None:
    """Add ``option``, defaulting to the environment variable named after it
    (``--log-level``: ``EVENTMILL_LOG_LEVEL``), else to ``default``."""
    variable = "EVENTMILL_" + option.removeprefix("--").replace("-", "_").upper()
    text = os.environ.get(variable)
    value = default
    if text is not None:
        try:
            value = text if type is None else type(text)
        except (argparse.ArgumentTypeError, ValueError) as error:
            parser.error(f"{variable}: {error}")
    shown = (
        ""
        if default is None
        else f"; default: {default.name.lower() if isinstance(default, NodeMode) else default}"
    )
    if type is not None:
        keywords["type"] = type
    parser.add_argument(option, default=value, help=f"{help} (env {variable}{shown})", **keywords)


def parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand; options default to ``EVENTMILL_*``
    environment variables (so a DSN with a password stays out of ``ps``)."""
    main_parser = _Parser(prog="eventmill", description="eventmill: event store and processing")
    main_parser.add_argument(
        "--version", action="version", version=f"eventmill {__version__}", help="print the version"
    )
    commands = main_parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo_parser = commands.add_parser("demo", help="process an order workflow and check it")
    _from_environment(demo_parser, "--dsn", help="PostgreSQL DSN (default: in memory)")
    demo_parser.add_argument(
        "--schema", help="a new PostgreSQL schema, dropped at the end (default: a random name)"
    )
    demo_parser.add_argument(
        "--events", type=_positive, default=20_000, help="events to publish (default: 20000)"
    )
    demo_parser.add_argument(
        "--nodes",
        type=_positive,
        default=1,
        help=f"with --dsn: node processes (`eventmill run`, at most {MAX_NODE_PROCESSES}); one "
        "stops partway and a new one replaces it, so sources move. Without --dsn: nodes "
        "inside this process on the in-memory backend, the last one stopping halfway",
    )
    run_parser = commands.add_parser(
        "run",
        help="run a node made by MODULE:ATTRIBUTE",
        description="Run the node that ATTRIBUTE(backend, mode=..., node_id=...) makes "
        "until SIGINT or SIGTERM. MODULE is imported from --app-dir (default: the current "
        "directory) or the Python path. Exit codes: 0 stopped gracefully, 1 failed, 2 bad "
        "arguments.",
    )
    run_parser.add_argument(
        "target", metavar="MODULE:ATTRIBUTE", help="the factory that makes the node"
    )
    _from_environment(
        run_parser, "--dsn", help="PostgreSQL DSN (default: in memory, nothing shared or kept)"
    )
    _from_environment(run_parser, "--direct-dsn", help=DIRECT_DSN_HELP)
    _from_environment(run_parser, "--schema", default="eventmill", help="PostgreSQL schema")
    _from_environment(
        run_parser,
        "--mode",
        type=_mode,
        default=NodeMode.BOTH,
        help="coordinator, observer or both",
    )
    _from_environment(run_parser, "--node-id", help="this node's id (default: hostname-pid-random)")
    _from_environment(
        run_parser,
        "--pool-size",
        type=_positive,
        default=10,
        help="most PostgreSQL connections of the node's pool",
    )
    _from_environment(
        run_parser, "--app-dir", default=".", help="folder to import MODULE from first"
    )
    _from_environment(
        run_parser,
        "--log-level",
        default="INFO",
        type=_log_level,
        help="lowest level logged on stderr: debug, info, warning, error",
    )
    _from_environment(
        run_parser,
        "--log-format",
        default="text",
        type=_log_format,
        help="text (one line per record) or json (one object per line)",
    )
    _from_environment(
        run_parser,
        "--http-port",
        type=_port,
        help="serve /metrics, /healthz and /readyz on this port (needs eventmill[http])",
    )
    _from_environment(
        run_parser, "--http-host", default="127.0.0.1", help="address to serve HTTP on"
    )
    _from_environment(
        run_parser,
        "--ready-max-lag",
        type=_lag_bound,
        help="/readyz fails while a group lags more than N events or Ns seconds",
    )
    migrate_parser = commands.add_parser("migrate", help="install or upgrade the schema")
    _from_environment(migrate_parser, "--dsn", help="PostgreSQL DSN (required)")
    _from_environment(migrate_parser, "--direct-dsn", help=DIRECT_DSN_HELP)
    _from_environment(migrate_parser, "--schema", default="eventmill", help="PostgreSQL schema")
    status_parser = commands.add_parser(
        "status",
        help="nodes, subscribers, sources and lag; a health check",
        description="Print the cluster's state. Exit codes: 0 healthy, 1 warnings, "
        "2 cannot check (bad arguments, cannot connect, schema missing).",
    )
    _from_environment(status_parser, "--dsn", help="PostgreSQL DSN (required)")
    _from_environment(status_parser, "--direct-dsn", help=DIRECT_DSN_HELP)
    _from_environment(status_parser, "--schema", default="eventmill", help="PostgreSQL schema")
    status_parser.add_argument("--json", action="store_true", help="print JSON")
    _from_environment(
        status_parser,
        "--fail-on-lag",
        type=_lag_bound,
        help="warn (exit 1) when a group lags more than N events or Ns seconds",
    )
    group_commands.add_parsers(commands, _connection_options)
    parked_commands.add_parsers(commands, _connection_options)
    console_parser = commands.add_parser(
        "console",
        help="serve the operations console, a live web page of the cluster",
        description="Serve the console until SIGINT or SIGTERM (needs the console extra). "
        "Read-only unless an operator token is given by --token-file or "
        "EVENTMILL_CONSOLE_TOKEN. Exit codes: 0 stopped, 1 failed, 2 bad arguments.",
    )
    _connection_options(console_parser)
    console_parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    console_parser.add_argument("--port", type=_positive, default=8765, help="port to listen on")
    console_parser.add_argument(
        "--token-file", help="file whose first line is the operator token (enables actions)"
    )
    return main_parser


DIRECT_DSN_HELP = (
    "PostgreSQL DSN for the connections that need a session of their own (locks, "
    "LISTEN, heartbeats, migrations) when --dsn goes through PgBouncer in transaction mode"
)


def _connection_options(parser: argparse.ArgumentParser) -> None:
    _from_environment(parser, "--dsn", help="PostgreSQL DSN (required)")
    _from_environment(parser, "--direct-dsn", help=DIRECT_DSN_HELP)
    _from_environment(parser, "--schema", default="eventmill", help="PostgreSQL schema")


def _log_level(text: str) -> str:
    if text.upper() not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LEVELS).lower()}")
    return text.upper()


def _log_format(text: str) -> str:
    if text not in FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r} is not text or json")
    return text


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {value}")
    return value


def _lag_bound(text: str) -> LagBound:
    try:
        return LagBound.parse(text)
    except InvalidSettingsError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _needs_dsn(dsn: str | None, command: str) -> str:
    if not dsn:
        raise CommandError(f"{command} needs --dsn or EVENTMILL_DSN")
    return dsn


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; return the exit code."""
    arguments = parser().parse_args(argv)
    try:
        return _dispatch(arguments)
    except BrokenPipeError:  # e.g. `eventmill status | head`: the reader left
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (CommandError, EventmillError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"eventmill: {message}", file=sys.stderr)
        return EXIT_CANNOT_CHECK if arguments.command == "status" else EXIT_FAILED
    except KeyboardInterrupt:
        print("eventmill: interrupted", file=sys.stderr)
        return 130


def _dispatch(arguments: argparse.Namespace) -> int:
    if arguments.command == "demo":
        if arguments.schema is not None and arguments.dsn is None:
            raise CommandError("--schema needs --dsn")
        return asyncio.run(demo(arguments.dsn, arguments.events, arguments.nodes, arguments.schema))
    if arguments.command == "run":
        return asyncio.run(
            run(
                arguments.target,
                arguments.dsn,
                arguments.schema,
                arguments.mode,
                arguments.node_id,
                pool_size=arguments.pool_size,
                app_dir=arguments.app_dir,
                operations=Operations(
                    log_level=arguments.log_level,
                    log_format=arguments.log_format,
                    http_host=arguments.http_host,
                    http_port=arguments.http_port,
                    ready_max_lag=arguments.ready_max_lag,
                ),
                direct_dsn=arguments.direct_dsn or None,
            )
        )
    dsn = _needs_dsn(arguments.dsn, arguments.command)
    direct_dsn: str | None = arguments.direct_dsn or None
    connect_here = functools.partial(connect, direct_dsn=direct_dsn)
    if arguments.command in group_commands.COMMANDS:
        return asyncio.run(group_commands.run(arguments, dsn, connect_here))
    if arguments.command in parked_commands.COMMANDS:
        return asyncio.run(parked_commands.run(arguments, dsn, connect_here))
    if arguments.command == "migrate":
        return asyncio.run(migrate(dsn, arguments.schema, direct_dsn))
    if arguments.command == "console":
        token = console_token(arguments.token_file)
        return asyncio.run(
            console(dsn, arguments.schema, arguments.host, arguments.port, token, direct_dsn)
        )
    return asyncio.run(
        status(dsn, arguments.schema, arguments.json, arguments.fail_on_lag, direct_dsn)
    )


if __name__ == "__main__":
    sys.exit(main())

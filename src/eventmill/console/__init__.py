"""The operations console: a live web page of the cluster, read from the database.

Needs the ``console`` extra (``pip install 'eventmill[console]'``: Starlette and
uvicorn). Serve it with ``eventmill console --dsn ...`` or mount ``ConsoleApp`` on an
existing ASGI app::

    from eventmill.console import ConsoleApp
    console = ConsoleApp(backend, token=operator_token)   # token None: read-only
    app.mount("/console", console)                        # e.g. a Starlette app
    ...
    await console.close()                                 # stops its reads

Importing it without the extra raises MissingDependencyError saying what to install.
"""

try:
    import starlette
    import uvicorn
except ImportError as error:
    from eventmill.errors import MissingDependencyError

    raise MissingDependencyError(
        f"the console needs {error.name or 'starlette'}: pip install 'eventmill[console]'"
    ) from error

from eventmill.console.app import ConsoleApp
from eventmill.console.cluster import ConsoleSettings

del starlette, uvicorn

__all__ = ["ConsoleApp", "ConsoleSettings"]

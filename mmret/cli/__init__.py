"""The `mmret` command line: each command parses options, builds a config, calls one library
function and renders its result. No logic lives here.

`app` holds the Typer app, the error handling and the shared options; `prepare`, `train`,
`inference`, `serve`, `export` and `quickstart` register their commands on it; `ui` draws tables and progress bars.
"""

from mmret.cli.app import app  # noqa: I001  (the modules below register their commands, in the order --help lists them)
from mmret.cli import prepare  # noqa: F401
from mmret.cli import train  # noqa: F401
from mmret.cli import inference  # noqa: F401
from mmret.cli import serve  # noqa: F401
from mmret.cli import export  # noqa: F401
from mmret.cli import quickstart  # noqa: F401
from mmret.cli import verify  # noqa: F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()

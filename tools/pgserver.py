"""A real PostgreSQL server from PyPI (the pgserver package's own build), for trying a study shared by
many workers and for the tests: `make pg-server`.

    python -m tools.pgserver DIR           # starts it (data in DIR), prints the study storage URL
    python -m tools.pgserver DIR --stop    # stops it (the data stays; start it again to go on)

It listens on a Unix socket in DIR only, so it serves the workers of this machine. Workers on other
machines need a PostgreSQL they can reach over the network (docs/scaling.md); the URL goes in
tune.yaml's `storage` either way.
"""

import argparse
from pathlib import Path


def _pg_ctl():
    """pgserver's runner of its bundled pg_ctl (as its own system user when run as root): the one
    private name used here, checked so that a pgserver release without it fails loudly."""
    from pgserver import _commands

    assert hasattr(_commands, "pg_ctl"), "pgserver no longer has _commands.pg_ctl: update tools/pgserver.py"
    return _commands.pg_ctl


def start(folder):
    """Starts the server on `folder` (created and initialised the first time); returns its storage URL."""
    import pgserver

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return pgserver.get_server(folder, cleanup_mode=None).get_uri()  # cleanup None: it outlives this process


def stop(folder):
    import getpass

    folder = Path(folder).resolve()
    user = "pgserver" if getpass.getuser() == "root" else None  # pgserver runs postgres as this user under root
    _pg_ctl()(["-w", "-m", "fast", "stop"], pgdata=folder, user=user)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.pgserver", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="the server's data folder")
    parser.add_argument("--stop", action="store_true", help="stop the server running on FOLDER")
    args = parser.parse_args(argv)
    if args.stop:
        stop(args.folder)
        print(f"pgserver: stopped the server on {args.folder}")
    else:
        print(start(args.folder))


if __name__ == "__main__":
    main()

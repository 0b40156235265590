"""``python -m fedrac.deploy {certs,node-keys,superlink,up,down,status}`` (also
``fedrac-deploy``)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from fedrac.deploy import procs
from fedrac.deploy.certs import make_certificates, make_node_keys
from fedrac.deploy.local import DEFAULT_CONNECTION, DeployError, Federation, down, up
from fedrac.deploy.runas import DEFAULT_USER, RunAsError
from fedrac.deploy.worker import worker_pids

DEFAULT_DIR = ".fedrac-federation"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedrac.deploy",
                                description="fedrac deployment helpers")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("superlink", add_help=False,
                   help="run a SuperLink with its Control API apart from the Fleet API "
                        "(--fleet-host/--fleet-port for SuperNodes, --host/--port for the flwr "
                        "CLI, other flower-superlink flags as they are)")
    c = sub.add_parser("certs", help="generate a local CA and a SuperLink TLS certificate")
    c.add_argument("--out", default="certs", help="output folder (default: certs)")
    c.add_argument("--host", action="append", default=[],
                   help="a name or IP clients use to reach the SuperLink (repeatable)")
    k = sub.add_parser("node-keys", help="generate SuperNode auth key pairs (EC P-384, OpenSSH)")
    k.add_argument("names", nargs="+", help="key names, e.g. site0 site1")
    k.add_argument("--out", default="keys", help="output folder (default: keys)")
    u = sub.add_parser("up", help="start a SuperLink and N SuperNodes on this machine")
    u.add_argument("--nodes", type=int, default=2)
    u.add_argument("--tls", action="store_true", help="TLS with a generated local CA")
    u.add_argument("--auth", action="store_true",
                   help="SuperNode authentication with registered keys (implies --tls)")
    u.add_argument("--data-path", action="append", default=[],
                   help="node i reads this folder instead of partition i (one per node)")
    u.add_argument("--host", default="127.0.0.1",
                   help="interface the SuperNodes reach the Fleet API on (default 127.0.0.1)")
    u.add_argument("--port", type=int, default=None,
                   help="Fleet API port (default: a free one)")
    u.add_argument("--control-host", default="127.0.0.1",
                   help="interface of the Control API, for the flwr CLI (default 127.0.0.1)")
    u.add_argument("--control-port", type=int, default=None,
                   help="Control API port (default: a free one)")
    u.add_argument("--connection", default=DEFAULT_CONNECTION,
                   help=f"SuperLink connection name in Flower's config (default: "
                        f"{DEFAULT_CONNECTION})")
    u.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of each node process (default 1; 0: leave unset)")
    u.add_argument("--dir", default=DEFAULT_DIR, help=f"state and logs (default: {DEFAULT_DIR})")
    u.add_argument("--no-workers", action="store_true",
                   help="no warm node workers: every message is handled in Flower's fresh "
                        "ClientApp process (slower: imports, config and data each time)")
    u.add_argument("--poll", type=float, default=0.1,
                   help="SuperNode idle polling interval in seconds (default 0.1; 0: Flower's "
                        "fixed 3 s)")
    u.add_argument("--run-as", default=DEFAULT_USER,
                   help=f"started by root: the account SuperNodes, apps and node workers run as "
                        f"(default: {DEFAULT_USER}; ignored when not root)")
    u.add_argument("--create-user", action="store_true",
                   help="started by root: create the --run-as account (a system account "
                        "without login) when it does not exist")
    d = sub.add_parser("down", help="stop the processes `up` started")
    d.add_argument("--dir", default=DEFAULT_DIR)
    s = sub.add_parser("status", help="show the recorded processes and whether they run")
    s.add_argument("--dir", default=DEFAULT_DIR)
    return p


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["superlink"]:  # every other flag goes to Flower's SuperLink
        from fedrac.deploy import superlink

        superlink.main(argv[1:])
        return
    args = _parser().parse_args(argv)
    try:
        if args.command == "certs":
            paths = make_certificates(args.out, args.host)
            for name, path in paths.items():
                print(f"{name}: {path}")
        elif args.command == "node-keys":
            for name in args.names:
                private, public = make_node_keys(args.out, name)
                print(f"{name}: private {private}, public {public}")
        elif args.command == "up":
            signal.signal(signal.SIGTERM, _interrupt)  # a killed `up` stops what it started
            fed = up(args.dir, args.nodes, tls=args.tls, auth=args.auth, host=args.host,
                     port=args.port, connection=args.connection, data_paths=args.data_path,
                     threads=args.threads or None, control_host=args.control_host,
                     control_port=args.control_port, workers=not args.no_workers,
                     poll=args.poll or None, run_as=args.run_as,
                     create_user=args.create_user)
            print(f"SuperLink (pid {fed.superlink_pid}): Fleet API for SuperNodes at "
                  f"{fed.address}, Control API for the flwr CLI at {fed.control_address} only; "
                  f"{len(fed.node_pids)} SuperNodes online; logs in {fed.dir}/logs")
            print(f"Flower connection '{fed.connection}' written to {fed.flwr_home}/config.toml")
            print("Run fedrac on it:")
            print(f"  {fed.run_line()}")
            print(f"Stop it: python -m fedrac.deploy down --dir {args.dir}")
        elif args.command == "down":
            stopped = down(args.dir)
            print(f"stopped {len(stopped)} processes: {' '.join(map(str, stopped))}")
        elif args.command == "status":
            fed = Federation.load(args.dir)
            names = {"superlink": fed.superlink_pid, **fed.node_pids}
            for name, pid in names.items():
                state = "running" if procs.alive(pid) else "stopped"
                print(f"{name:14s} pid {pid:<8d} {state:8s} log {fed.log(name)}")
            for name in fed.node_pids:
                for pid in worker_pids(fed.worker_dir(name)):
                    state = "running" if procs.alive(pid) else "stopped"
                    print(f"  worker of {name}: pid {pid:<8d} {state:8s} in "
                          f"{fed.worker_dir(name)}")
            if fed.run_as:
                print(f"SuperNodes, apps and node workers run as user {fed.run_as}")
    except RunAsError as err:
        print(f"fedrac.deploy: error: {err}", file=sys.stderr)
        sys.exit(2)
    except DeployError as err:
        print(f"fedrac.deploy: error: {err}", file=sys.stderr)
        sys.exit(1)

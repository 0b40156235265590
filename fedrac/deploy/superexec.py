"""``python -m fedrac.deploy.superexec <flower-superexec arguments>``: Flower's own
``flower-superexec``, for a SuperExec that runs as another account than its parent.

A root-started deployment runs the SuperLink's SuperExec (and so its ServerApps) as the
unprivileged ``--run-as`` account (:mod:`fedrac.deploy.superlink`). Flower's
``--parent-pid`` watch asks ``os.kill(pid, 0)``, which another account's parent answers
with EPERM, read as "gone": the SuperExec would stop at once. This launcher counts EPERM as
alive; nothing else differs.
"""

from __future__ import annotations

from fedrac.deploy.procs import pid_exists


def main() -> None:
    """Run ``flower-superexec`` with this process's arguments and the EPERM-aware watch."""
    from flwr.supercore import app_utils
    from flwr.supercore.cli.flower_superexec import flower_superexec

    app_utils._pid_exists = pid_exists
    flower_superexec()


if __name__ == "__main__":
    main()

"""A startup error that no restart can fix stops the whole server, with a non-zero exit.

BentoML's process manager (circus, in the `bentoml serve` process) restarts a service process that
exits, forever outside a container. For the encoder that is right after a crash, and wrong when it
cannot start at all (BARLOW_DEVICE=cuda without a working CUDA provider, an unloadable model): the
server would loop, never ready, and `barlow serve` would never say why. So:

- `install_supervisor_hook()` runs in the `bentoml serve` process before any service process starts
  (a BentoML `on_deployment` hook). It records that process's id in the environment the service
  processes inherit, and makes SIGUSR1 stop all services there.
- `stop_server(reason)` runs in a service process: it logs the reason (one sentence) and sends that
  SIGUSR1. With no service process left, circus stops and `bentoml serve` exits 1 ("No active process
  found for watcher"), the same exit a Bento container (no restarts there) takes on its own.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

SUPERVISOR_ENV = "SERVING_SUPERVISOR_PID"  # internal, not a setting: set by the hook, read by stop_server
STOP_SIGNAL = signal.SIGUSR1  # circus handles HUP, QUIT, INT, TERM and WINCH, not USR1


def install_supervisor_hook() -> None:
    """In the `bentoml serve` process: SIGUSR1 stops every service process (circus then exits 1)."""
    os.environ[SUPERVISOR_ENV] = str(os.getpid())  # circus copies this environment into every service
    signal.signal(STOP_SIGNAL, stop_all_services)


def stop_all_services(signum: int, frame: object) -> None:
    """Signal handler: ask circus's loop to stop all watchers, as `circusctl stop` does.

    circus's own SIGTERM handler holds its controller, hence the loop and the arbiter; without it
    (a circus that changed) fall back to SIGTERM: a graceful stop that exits 0.
    """
    controller = getattr(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), "controller", None)
    if controller is None or not hasattr(controller, "arbiter"):
        logger.error("a service cannot start; stopping the server")
        os.kill(os.getpid(), signal.SIGTERM)
        return
    logger.error("a service cannot start; stopping all services")
    loop = controller.loop
    schedule = getattr(loop, "add_callback_from_signal", None) or loop.add_callback  # safe from a signal handler
    schedule(controller.arbiter.stop_watchers)


def stop_server(reason: str) -> bool:
    """In a service process: log `reason` and stop the whole server. False (only logged) when this
    process was not started under `install_supervisor_hook`, e.g. in a test or another host."""
    logger.error("cannot start: %s", reason)
    supervisor = os.environ.get(SUPERVISOR_ENV, "")
    if not supervisor.isdigit() or int(supervisor) != os.getppid():  # never signal a process we do not know
        return False
    os.kill(int(supervisor), STOP_SIGNAL)
    return True

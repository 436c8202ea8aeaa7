"""`barlow-torchrun`: torchrun with exit codes a Kubernetes Job can tell apart.

torchrun takes the same arguments and runs the same agent; only its exit code changes. torchrun exits
1 for every failure, so a Job's podFailurePolicy cannot tell a broken run from an agent that merely lost
its peers. Two cases are not the run's fault and need telling apart:

- The rendezvous store is unreachable or was lost (RendezvousConnectionError): pod 0, which hosts the
  store, was preempted or replaced, or has not started listening yet. Exit 75 (EX_TEMPFAIL, "try
  again"); the training Job's podFailurePolicy restarts the pod without counting it.
- A signal stopped the agent (SignalException; the kubelet's SIGTERM on preemption): exit 128 + N, 143
  for SIGTERM, as a shell reports a signalled process, once the workers have written their stop
  checkpoint.

Anything else keeps torchrun's behaviour: 0 on success, and the traceback and exit 1 otherwise.
"""

from __future__ import annotations

import sys

STORE_UNREACHABLE = 75


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as exc:
        print(f"barlow-torchrun: stopped by signal {exc.sigval.name}: exit {128 + int(exc.sigval)}", file=sys.stderr)
        return 128 + int(exc.sigval)
    except RendezvousConnectionError as exc:
        cause = str(exc.__cause__ or "").partition("\n")[0]  # torch's own message, without its C++ frames
        print(f"barlow-torchrun: the rendezvous store cannot be reached{f' ({cause})' if cause else ''}: "
              f"exit {STORE_UNREACHABLE}, "
              "a retry without the Job counting a failure", file=sys.stderr)
        return STORE_UNREACHABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())

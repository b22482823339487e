"""The driver's word to its workers that the run is to stop (Ctrl-C, SIGTERM from a scheduler,
Kueue's suspend, `stoker jobs stop`): a named actor that the driver raises and that rank 0 reads
at its drain polls (stoker.trainer.preemption), so every rank checkpoints where it is before the
driver goes. Its own module, importing Ray alone: the actor's process loads this and nothing
heavier."""

import ray

STOP_WAIT_S = 30.0
"""How long a stopping driver waits for the workers' checkpoint: Kubernetes' default grace
period (a submitted job's supervisor is told to wait a little longer, cluster/jobs.py)."""


# Restarted wherever it can run if its node is lost (a drained or preempted node), with calls
# retried meanwhile: the workers restarted on the nodes that remain look it up again, and a
# lost flag would fail every attempt after a node loss. A restart forgets a raised flag: that
# matters only when the node goes while the driver is stopping, which then ends the workers
# without their checkpoint (as before the flag existed).
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class StopFlag:
    """Raised by the driver when the run is to stop; read by rank 0 at its polls."""

    def __init__(self) -> None:
        self.raised = False
        self.polled = False

    def raise_(self) -> bool:
        """Raise the flag; True when rank 0 has polled it, so a checkpoint is worth waiting for
        (before the first poll the workers are still starting, with nothing new to save)."""
        self.raised = True
        return self.polled

    def is_set(self) -> bool:
        self.polled = True
        return self.raised

"""The worker: sends queued tasks to the providers within their limits (`dispatcher`) and
finishes the tasks whose callbacks never come (`reconciler`); `runner.Worker` runs both."""

from receiver.worker.runner import Worker, run_worker

__all__ = ["Worker", "run_worker"]

"""What lives in Redis and how it is written: the transition script and the task store
(`tasks`), the pipelining connection that runs it (`batcher`), who holds which provider task
id (`claims`) and the accounts' queues and slots (`admission`)."""

from receiver.store.admission import Admission, Member
from receiver.store.batcher import ClusterBatcher, ScriptBatcher
from receiver.store.claims import ClaimRegistry
from receiver.store.tasks import TRANSITION, Outcome, TaskStore, snapshot

__all__ = ["TRANSITION", "Admission", "ClaimRegistry", "ClusterBatcher", "Member", "Outcome",
           "ScriptBatcher", "TaskStore", "snapshot"]

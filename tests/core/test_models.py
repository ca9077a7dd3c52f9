"""receiver.core.models: the job ids' order."""

from __future__ import annotations

from receiver.core.constants import JOB_ID_RE
from receiver.core.models import new_job_id


def test_job_ids_made_in_one_millisecond_sort_in_the_order_they_were_made() -> None:
    ids = [new_job_id() for _ in range(5000)]  # many share a millisecond
    assert len({i[:12] for i in ids}) < len(ids)
    assert sorted(ids) == ids and len(set(ids)) == len(ids)
    assert all(JOB_ID_RE.match(i) for i in ids)

"""Event types come from each kind's reason enum (api.conditions.Reason), not from strings."""
from __future__ import annotations

from tuneserve.api.conditions import Severity
from tuneserve.api.finetunejob_status import ConditionReason
from tuneserve.api.modelserve_status import ServeConditionReason
from tuneserve.core.plan import condition_events


def _names(reasons, pick):
    return {r.value for r in reasons if pick(r)}


def test_which_reasons_are_warnings():
    assert _names(ConditionReason, lambda r: r.severity == Severity.Warning) == {
        "InvalidSpec", "ModelSizeUnknown", "NoAcceptableChoice", "TrainingFailed", "BackoffLimitExceeded",
        "SecretNotFound", "ReferenceNotFound", "FellBack"}
    assert _names(ServeConditionReason, lambda r: r.severity == Severity.Warning) == {
        "InvalidSpec", "ModelSizeUnknown", "NoAcceptableChoice", "SecretNotFound", "ReferenceNotFound", "FellBack",
        "ApplicationFailed",
        "AdaptersFailed", "ReplicasUnavailable", "AdaptersUnavailable", "ApplicationUnhealthy", "ReplicaFailed"}


def test_which_reasons_post_no_event_when_they_first_appear():
    assert _names(ConditionReason, lambda r: r.quiet) == {"InProgress", "NotSuspended", "NotStarted", "NoCheckpointYet",
                                                          "Placing"}
    assert _names(ServeConditionReason, lambda r: r.quiet) == {"AsDesired", "NoUpgrade", "NoAdapters", "NotPlaced", "Placing"}


def test_events_take_the_reason_severity():
    from datetime import datetime, timezone
    from tuneserve.api.finetunejob_status import Condition, ConditionType, FineTuneJobStatus
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    new = FineTuneJobStatus(conditions=[Condition(type=ConditionType.Placed, status="True", reason=ConditionReason.FellBack,
                                                  message="m", last_transition_time=now)])
    (event,) = condition_events(None, new)
    assert (event.type, event.reason) == ("Warning", "FellBack")


def test_every_reason_belongs_to_a_condition_type_and_every_type_has_reasons():
    from tuneserve.api import finetunejob_status as ftj, modelserve_status as ms
    for types, reasons, table in ((ftj.ConditionType, ConditionReason, ftj.REASONS),
                                  (ms.ServeConditionType, ServeConditionReason, ms.REASONS)):
        assert set(table) == set(types)
        assert set().union(*table.values()) == set(reasons)


def test_a_reason_outside_its_type_is_refused():
    import pytest
    from datetime import datetime, timezone
    from tuneserve.api.finetunejob_status import REASONS, Condition, ConditionType
    from tuneserve.core.status import ConditionSet, Verdict
    conditions = ConditionSet(Condition, REASONS, None, datetime(2026, 1, 1, tzinfo=timezone.utc), 1)
    with pytest.raises(ValueError, match="does not belong"):
        conditions.set(ConditionType.Checkpointed, Verdict("True", ConditionReason.Training))

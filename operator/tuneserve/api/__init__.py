"""Typed API of tuneserve's custom resources (the CRDs are generated from these models)."""
from tuneserve.api.finetunejob import FineTuneJob, FineTuneJobSpec  # noqa: F401
from tuneserve.api.finetunejob_status import FineTuneJobStatus  # noqa: F401

"""Jobs: which command runs a spec, and submitting specs to a Ray cluster (Ray Job Submission API)."""

from earthray.jobs.kinds import KINDS, check_spec, spec_kind
from earthray.jobs.submit import (
    DEFAULT_ADDRESS,
    JobError,
    auth_token,
    client,
    default_address,
    logs,
    message,
    status,
    stop,
    submit,
    wait,
)

__all__ = ["DEFAULT_ADDRESS", "KINDS", "JobError", "auth_token", "check_spec", "client", "default_address", "logs",
           "message", "spec_kind", "status", "stop", "submit", "wait"]

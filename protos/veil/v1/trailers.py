"""The trailing-metadata keys of veil's error statuses: the part of the wire contract that a .proto
cannot declare (see the error table at the top of veil.proto, and status.proto).

Hand-written, beside the generated code (protos/generate.py writes only the *_pb2* files), so
that the server that writes these trailers and every client that reads them (the researcher's,
the auditor's) share one spelling. It ships in the client's own distribution with the rest of
`protos.veil.v1`, and imports nothing.
"""

from __future__ import annotations

from typing import Final

# A serialized RpcStatus (status.proto), wire-identical to google.rpc.Status: sent with every
# budget refusal (RESOURCE_EXHAUSTED), its details holding one QuotaFailure under this type URL.
STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"
QUOTA_FAILURE_TYPE_URL: Final = "type.googleapis.com/google.rpc.QuotaFailure"

# A budget refusal, in plain text: which budget ("client", "institution", "dataset") and what is
# left in it, as decimal text ("0.2", "1/3").
BUDGET_SCOPE_KEY: Final = "veil-budget-scope"
BUDGET_REMAINING_KEY: Final = "veil-budget-remaining"

# INVALID_ARGUMENT: the variable at fault, when one is.
VARIABLE_KEY: Final = "veil-variable"

# RESOURCE_EXHAUSTED that is not a budget (the rate limit, the concurrency cap): the seconds to
# wait before calling again, as decimal text ("0.250").
RETRY_AFTER_KEY: Final = "retry-after"

# DEADLINE_EXCEEDED from the server's time limit after the charge was held: "1". The request id
# is spent (charged, nothing released), so a retry under it is refused; ask under a new one.
REQUEST_SPENT_KEY: Final = "veil-request-spent"

__all__ = [
    "BUDGET_REMAINING_KEY",
    "BUDGET_SCOPE_KEY",
    "QUOTA_FAILURE_TYPE_URL",
    "REQUEST_SPENT_KEY",
    "RETRY_AFTER_KEY",
    "STATUS_DETAILS_KEY",
    "VARIABLE_KEY",
]

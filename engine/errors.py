"""The engine's one error hierarchy.

Every message names what was rejected and why, and never contains a value read from the
private data: a rejection must reveal nothing about the records. The server maps these classes
to gRPC status codes in one table.
"""

from __future__ import annotations


class VeilError(Exception):
    """Base of every error the engine raises on purpose."""


class CodebookError(VeilError):
    """A codebook file is malformed or inconsistent."""


class InvalidQueryError(VeilError):
    """A query does not fit the codebook: unknown variable, value outside its domain, bad shape.

    Raised before any data is touched, so the rejection depends on the codebook only.
    """

    def __init__(self, message: str, *, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable


class LimitExceededError(InvalidQueryError):
    """A query is well formed but larger than the configured limits (cells, dimensions, depth)."""

    # The filter limits are checked twice, on the wire before a tree is built and in the planner
    # for any caller: one wording for both.
    @classmethod
    def filter_depth(cls, limit: int) -> LimitExceededError:
        return cls(f"filter nesting exceeds the maximum depth of {limit}")

    @classmethod
    def filter_terms(cls, limit: int) -> LimitExceededError:
        return cls(f"filter has more than the maximum of {limit} terms")


class InvalidLossError(VeilError):
    """A privacy-loss amount is not a finite positive number within the allowed range."""


class LoadError(VeilError):
    """A source file cannot be loaded: unreadable, wrong columns, or out of domain when strict."""


class DataFileExistsError(LoadError):
    """The data file to be written exists, and replacing it was not asked for."""

    def __init__(self, path: object) -> None:
        super().__init__(f"{path} exists; replace it with overwrite=True")
        self.path = path

    def for_shell(self, command: str) -> str:
        """The refusal in a command's words: its flag, not the Python keyword."""
        return f"{command}: {self.path} exists; replace it with --overwrite"


class BudgetExceededError(VeilError):
    """A charge would take a client, institution or the dataset past its cap."""

    def __init__(self, message: str, *, scope: str, remaining: str) -> None:
        super().__init__(message)
        self.scope = scope
        self.remaining = remaining


class LedgerUnavailableError(VeilError):
    """The ledger cannot durably record a charge; nothing is released."""


class LedgerIntegrityError(LedgerUnavailableError):
    """The ledger's audit log or totals fail verification; it serves nothing until checked."""


class UnknownClientError(VeilError):
    """The client is not registered with the ledger, or its registration has been revoked."""


class RevokedClientError(UnknownClientError):
    """The client asking for a release has been revoked (perhaps while its query ran)."""


class ClientRegistryError(VeilError):
    """A client, institution or cap change is invalid or conflicts with what is recorded."""


class RequestConflictError(VeilError):
    """A request id was reused for a different query."""


class QueryCancelledError(VeilError):
    """The query was cancelled or its deadline passed; its reservation is released."""

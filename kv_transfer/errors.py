"""Exceptions raised by kv_transfer: one class per failure the caller reacts to differently."""


class KVTransferError(Exception):
    """Base class: anything that went wrong moving KV between agents."""


class LayoutMismatchError(KVTransferError, ValueError):
    """The handles and the destination cannot be combined (a caller bug, raised synchronously)."""


class HandleExpiredError(KVTransferError):
    """The handle's time-to-live passed before the pull started; the sender has freed the blocks."""


class PullRefusedError(KVTransferError):
    """The sender refused the pull. Deliberately vague: wrong secret, unknown, expired and
    already-released requests all look the same, so a caller learns nothing about other requests."""


class PeerNotAllowedError(KVTransferError):
    """The handle names an agent that this agent's allow-list excludes; nothing was contacted."""


class PeerUnreachableError(KVTransferError):
    """The sender could not be reached or never answered the pull request in time."""


class PeerLostError(KVTransferError):
    """The peer died or its connection broke after the transfer had started."""


class TransferTimeoutError(KVTransferError):
    """The transfer made no progress within `transfer_timeout_s`."""


class MalformedMessageError(KVTransferError):
    """Bytes on the wire (or a handle) failed to decode: truncated, corrupted or of the wrong size."""


class UnauthenticatedMessageError(MalformedMessageError):
    """A control message without a valid MAC under the deployment key: dropped, never raised to a caller."""


class AgentClosedError(KVTransferError):
    """The agent was closed while the operation was pending, or used after close()."""

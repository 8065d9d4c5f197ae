"""vmtide: shared pieces of the guest agent and the host broker."""

__version__ = "0.1.0"

# The gRPC contract version both sides speak (proto package vmtide.v1).
PROTOCOL_VERSION = 1

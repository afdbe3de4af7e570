"""The tamper-evident audit log: hash-chained records, signed checkpoints, offline verification."""

from gateway.audit.chain import GENESIS, VerifyReport, verify_paths
from gateway.audit.writer import AuditUnavailable, AuditWriter

__all__ = ["GENESIS", "AuditUnavailable", "AuditWriter", "VerifyReport", "verify_paths"]

"""The run record moved to `timm_ic.run_record` (the hub and diagnostics read it too, so it sits below them);
these names stay importable from here (diagnostics/report.py imports write_json_atomic from this module)."""
from ..run_record import RUN_RECORD_SCHEMA, RunRecord, RunRecordError, finite_json, library_versions, write_json_atomic

__all__ = ['RUN_RECORD_SCHEMA', 'RunRecord', 'RunRecordError', 'finite_json', 'library_versions', 'write_json_atomic']

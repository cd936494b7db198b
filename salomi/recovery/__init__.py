"""Distillation that recovers quality at the same bit rate (`salomi recover`)."""

from salomi.recovery.distill import format_report, run_recover

__all__ = ["run_recover", "format_report"]

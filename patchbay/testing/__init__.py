"""Test a flow before it goes live: run events through its steps and routing with every destination
captured, simulated answers through the real delivery policy, and expectations checked."""

from __future__ import annotations

from patchbay.testing.cases import FlowTestFile, find_test_files, is_test_file, load_test_file
from patchbay.testing.harness import Captured, FlowRun, Response, offline_sinks, simulate
from patchbay.testing.runner import CaseResult, Report, junit_xml, run_project

__all__ = [
    "CaseResult",
    "Captured",
    "FlowRun",
    "FlowTestFile",
    "Report",
    "Response",
    "find_test_files",
    "is_test_file",
    "junit_xml",
    "load_test_file",
    "offline_sinks",
    "run_project",
    "simulate",
]

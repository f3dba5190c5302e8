"""The registry of suites, by the name ``--suite`` takes."""

from __future__ import annotations

from .recurrence import RecurrenceSuite
from .scans import LinearScanSuite, SelectiveScanSuite

SUITES = {
    "lstm": RecurrenceSuite("lstm"),
    "gru": RecurrenceSuite("gru"),
    "rnn": RecurrenceSuite("rnn"),
    "selective_scan": SelectiveScanSuite(),
    "linear_scan": LinearScanSuite(),
}

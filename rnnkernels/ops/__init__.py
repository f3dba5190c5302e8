"""Functional API: one layer and direction of each recurrence, and the scans."""

from .linear_scan import linear_scan
from .recurrence import gru, lstm, rnn
from .selective_scan import selective_scan

__all__ = ["gru", "linear_scan", "lstm", "rnn", "selective_scan"]

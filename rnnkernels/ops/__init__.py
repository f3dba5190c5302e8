"""Functional API: one layer and direction of each recurrence, and the scans."""

from .recurrence import gru, lstm, rnn

__all__ = ["gru", "lstm", "rnn"]

"""Plain-PyTorch references: step by step, readable, any dtype (float64 included).

They define what correct means for every kernel of the package and never call our kernels.
"""

from .linear_scan import linear_scan_reference
from .recurrence import (
    gru_recurrence,
    gru_reference,
    lstm_recurrence,
    lstm_reference,
    rnn_recurrence,
    rnn_reference,
)
from .selective_scan import selective_scan_reference

__all__ = ["gru_recurrence", "gru_reference", "linear_scan_reference", "lstm_recurrence",
           "lstm_reference", "rnn_recurrence", "rnn_reference", "selective_scan_reference"]

"""Plain-PyTorch references: step by step, readable, any dtype (float64 included).

They define what correct means for every kernel of the package and never call our kernels.
"""

from .recurrence import gru_reference, lstm_reference, rnn_reference

__all__ = ["gru_reference", "lstm_reference", "rnn_reference"]

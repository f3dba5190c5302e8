"""Modules: drop-in LSTM / GRU / RNN."""

from .rnn import GRU, LSTM, RNN, RNNBase
from .ssm import Mamba

__all__ = ["GRU", "LSTM", "RNN", "Mamba", "RNNBase"]

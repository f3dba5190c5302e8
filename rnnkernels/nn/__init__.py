"""Modules: drop-in LSTM / GRU / RNN."""

from .rnn import GRU, LSTM, RNN, RNNBase

__all__ = ["GRU", "LSTM", "RNN", "RNNBase"]

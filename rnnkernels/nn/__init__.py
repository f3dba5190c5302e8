"""Modules: drop-in LSTM / GRU / RNN."""

from .attention import BahdanauAttention
from .linear_ssm import LinearSSM
from .rnn import GRU, LSTM, RNN, RNNBase

__all__ = ["GRU", "LSTM", "RNN", "BahdanauAttention", "LinearSSM", "RNNBase"]

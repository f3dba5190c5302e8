"""Modules: drop-in LSTM / GRU / RNN for torch.nn, and the Mamba block of mamba_ssm."""

from .rnn import GRU, LSTM, RNN, RNNBase
from .ssm import Mamba

__all__ = ["GRU", "LSTM", "RNN", "Mamba", "RNNBase"]

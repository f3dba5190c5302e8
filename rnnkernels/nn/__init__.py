"""Modules: drop-in LSTM / GRU / RNN for torch.nn, the Mamba block of mamba_ssm, additive
(Bahdanau) attention and a diagonal linear state-space layer."""

from .attention import BahdanauAttention
from .linear_ssm import LinearSSM
from .rnn import GRU, LSTM, RNN, RNNBase
from .ssm import Mamba

__all__ = ["GRU", "LSTM", "RNN", "BahdanauAttention", "LinearSSM", "Mamba", "RNNBase"]

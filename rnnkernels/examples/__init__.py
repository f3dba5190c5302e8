"""Demos of the claims of the project's seed document, run with the package's own modules.

Each is a module run as ``python -m rnnkernels.examples.<name>`` with a fixed seed; it prints a
table and writes ``<name>.md`` and ``<name>*.png`` into ``--out`` (default ``docs``). ``--tiny``
runs a setting small enough for the tests.

- ``gradient_flow``: vanishing / exploding gradients of the tanh RNN, the LSTM's forget-gate
  highway, what that means for learning a lag of 50 steps, and truncated BPTT.
- ``seq2seq_attention``: the fixed-vector bottleneck of an encoder-decoder, and Bahdanau
  attention removing it.
- ``ssm_modes``: a linear SSM computed as a recurrence, a scan and an FFT convolution.
"""

"""Triton kernels, one module per family (recurrence.py, selective_scan.py, linear_scan.py), each
registered with torch.library.triton_op so that it traces under torch.compile."""

"""The ScalingCache torch.compile backend and its lowering (``sc_compile.backends``)."""

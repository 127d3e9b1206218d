"""The model in plain PyTorch: frozen backbone, weights, heads, losses and the SmooSeg net."""

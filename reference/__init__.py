"""PyTorch reference models of the LDM paper (Rombach et al., CVPR 2022)."""

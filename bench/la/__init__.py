"""Laplace approximations of an embedding net's contrastive-loss posterior: mined pairs, Jacobians,
curvature by structure, Gaussian posteriors and prior-precision tuning."""

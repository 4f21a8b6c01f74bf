"""Parameterized optimizer families whose coefficients are learned by hyper-gradient descent."""

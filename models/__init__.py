"""Policies: torch.nn.Modules mapping a batch of observations to one Q-value per action."""

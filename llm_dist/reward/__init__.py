"""Reward modelling: preference pairs, the Bradley-Terry / margin losses, the stage, and the frozen scorer."""

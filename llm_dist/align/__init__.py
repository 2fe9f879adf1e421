"""Preference alignment of a policy without a reward model: DPO and its variants (IPO, hinge, SimPO)."""

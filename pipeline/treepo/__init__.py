"""The TreePO algorithm: segment-tree sampling (``sampling``), tree advantages (``advantage``),
rewards and tasks (``rewards``, ``tasks``, ``gym`` for reasoning-gym), and the cost model of tree
against independent sampling (``costs``). Imports nothing of the weights or the tools."""

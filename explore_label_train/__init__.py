"""explore_label_train: a DP-GEN-like active-learning loop on dpmd (`elt run | status | report`).

Kept import-light: worker processes import only the labellers (ASE, numpy), never torch.
"""

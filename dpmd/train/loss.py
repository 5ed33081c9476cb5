"""DeePMD-kit's energy loss (`ener`): energy, force and virial terms with scheduled prefactors.

    L = pe/N * <(dE)^2> + pf * <(dF)^2> + pv/N * <(dW)^2>     (1/N^2 for E and W with intensive_ener_virial)
Terms whose label is missing from the batch are skipped.  RMSEs reported are DeePMD's:
rmse_e and rmse_v per atom, rmse_f per component, rmse = sqrt(L).
"""

from __future__ import annotations

import torch

from dpmd.train.schedule import prefactor


class EnergyLoss:
    def __init__(self, loss_cfg: dict, start_lr: float):
        self.cfg, self.start_lr = loss_cfg, start_lr

    def prefactors(self, lr: float) -> dict:
        c = self.cfg
        return {k: prefactor(c[f"start_pref_{k}"], c[f"limit_pref_{k}"], lr, self.start_lr) for k in ("e", "f", "v")}

    def __call__(self, pred: dict, label: dict, natoms: int, lr: float):
        pref = self.prefactors(lr)
        loss = pred["energy"].new_zeros(())
        metrics = {}
        norm = 1.0 / natoms
        loss_norm = norm * norm if self.cfg["intensive_ener_virial"] else norm
        if label.get("energy") is not None:
            l2 = torch.mean((pred["energy"] - label["energy"]) ** 2)
            if pref["e"] > 0:
                loss = loss + loss_norm * pref["e"] * l2
            metrics["rmse_e"] = float(l2.detach().sqrt()) * norm
        if label.get("force") is not None:
            l2 = torch.mean((pred["force"] - label["force"]) ** 2)
            if pref["f"] > 0:
                loss = loss + pref["f"] * l2
            metrics["rmse_f"] = float(l2.detach().sqrt())
        if label.get("virial") is not None:
            l2 = torch.mean((pred["virial"] - label["virial"]) ** 2)
            if pref["v"] > 0:
                loss = loss + loss_norm * pref["v"] * l2
            metrics["rmse_v"] = float(l2.detach().sqrt()) * norm
        metrics["rmse"] = float(loss.detach().sqrt())
        return loss, metrics

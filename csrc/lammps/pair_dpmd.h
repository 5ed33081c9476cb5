// pair_style dpmd: a dpmd frozen (TorchScript) model as a LAMMPS many-body pair style.
//
//   pair_style dpmd model1.pth [model2.pth ...] [out_freq N] [out_file model_devi.out] [atomic] [relative EPS]
//                   [fparam V1 ... Vn] [aparam V1 ... Vm] [device auto|cpu|cuda]
//   pair_coeff * * O H
//
// fparam / aparam (DeePMD-kit's pair_style deepmd keywords): the models' frame parameters (numb_fparam values)
// and atomic parameters (numb_aparam values, the same for every atom), constant through the run.
//
// device: where the models run.  auto (the default) and cuda: the GPU of this rank's node-local rank modulo
// the node's GPU count (DeePMD-kit's rule), auto falling back to the CPU when libtorch sees no GPU; cpu:
// the CPU.  On a GPU each step's positions (local + ghost), types and edges go to the device in one
// copy each (through pinned host buffers) and each model's outputs come back in one.
//
// The first model drives the dynamics.  With several models every model is evaluated every
// out_freq steps and the ensemble deviation is written (by rank 0) with DeePMD-kit's columns.
// The model runs in "ghost" mode: local atoms followed by LAMMPS's ghost atoms, a full neighbour
// list from local centres; forces on ghosts go back to their owners by reverse communication.
// SPDX-License-Identifier: LGPL-3.0-or-later

#ifndef DPMD_PAIR_DPMD_H
#define DPMD_PAIR_DPMD_H

#include "pair.h"

#include <torch/script.h>

#include <cstdio>
#include <string>
#include <vector>

namespace LAMMPS_NS {

class PairDPMD : public Pair {
 public:
  PairDPMD(class LAMMPS *);
  ~PairDPMD() override;

  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;

 private:
  struct Model {
    std::string path;
    torch::jit::Module module;
    std::vector<std::string> type_map;
    double rcut = 0.0;
    std::vector<int> lmp_to_model;  // LAMMPS type (1-based) -> model type index
    torch::Tensor type_index;       // lmp_to_model on the device (int64), indexed by LAMMPS's types there
    int dim_fparam = 0, dim_aparam = 0;  // numb_fparam / numb_aparam (0 for models frozen before they existed)
    bool has_default_fparam = false;
  };

  std::vector<Model> models;
  double rcut_max = 0.0;
  int out_freq = 100;
  std::string out_file = "model_devi.out";
  bool atomic = false;
  bool relative = false;
  double relative_eps = 0.0;
  std::vector<double> fparam, aparam;  // the fparam / aparam keywords' values (empty: not given)
  torch::Tensor fparam_t, aparam_t;    // the same on the device (undefined: not given)
  std::string device_kind = "auto";    // the device keyword
  torch::Device device = torch::kCPU;
  torch::Tensor stage_coord, stage_type, stage_edge;    // pinned host buffers of the uploads (CUDA only)
  FILE *devi_fp = nullptr;
  bigint last_devi_step = -1;

  // forces of every model on every (local + ghost) atom, for the deviation's reverse communication
  std::vector<double> model_forces;
  int comm_models = 0;

  void allocate();
  void select_device();
  torch::Tensor upload(torch::Tensor &stage, const void *data, int64_t n, torch::ScalarType dtype);
  void load_model(const std::string &path);
  void open_devi_file();
  void check_params();
  torch::Tensor evaluate(Model &model, const torch::Tensor &coord, const torch::Tensor &type, int nlocal,
                         const torch::Tensor &center, const torch::Tensor &neighbor, bool atom_energy,
                         bool atom_virial);
  void write_deviation(const std::vector<torch::Tensor> &forces, const std::vector<double> &virials,
                       const std::vector<double> &energies, int nlocal, int nall);
};

}    // namespace LAMMPS_NS

#endif

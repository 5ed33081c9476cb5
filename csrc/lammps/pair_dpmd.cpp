// pair_style dpmd (see pair_dpmd.h).
// SPDX-License-Identifier: LGPL-3.0-or-later

#include "pair_dpmd.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"

#include <c10/core/DeviceGuard.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/cuda.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/script.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

using namespace LAMMPS_NS;

namespace {

const char *const METADATA_FILE = "dpmd.json";
const char *const KEYWORDS = "out_freq, out_file, atomic, relative, fparam, aparam, device";

bool is_keyword(const std::string &word)
{
  return word == "out_freq" || word == "out_file" || word == "atomic" || word == "relative" || word == "fparam" ||
         word == "aparam" || word == "device" || word == "fparam_from_compute" || word == "fparam_from_fix" ||
         word == "aparam_from_compute" || word == "ttm";
}

bool file_exists(const std::string &path)
{
  std::ifstream in(path);
  return in.good();
}

// The message of a torch error without its C++ backtrace; for errors raised inside the
// TorchScript model (a source excerpt, then "RuntimeError: dpmd: atom 3 has ..."), the model's message.
std::string torch_message(const std::exception &err)
{
  std::string text;
  if (auto *c10err = dynamic_cast<const c10::Error *>(&err))
    text = c10err->what_without_backtrace();
  else
    text = err.what();
  std::istringstream lines(text);
  std::string line, first, raised;
  while (std::getline(lines, line)) {
    auto pos = line.find("Error: dpmd: ");
    if (pos != std::string::npos) raised = line.substr(pos + 13);
    pos = line.find("dpmd.errors.DpmdError: ");    // the model's own checks (e.g. of fparam / aparam)
    if (pos != std::string::npos) raised = line.substr(pos + 23);
    if (first.empty() && !line.empty()) first = line;
  }
  return raised.empty() ? first : raised;
}

extern "C" void *dpmd_create_pair(void *lmp);

// The kernel library's path: DPMD_OPS_LIBRARY, else what `dpmd build-lammps-plugin` wrote beside this library.
std::string ops_library_path()
{
  const char *env = std::getenv("DPMD_OPS_LIBRARY");
  if (env && *env) return env;
  Dl_info self;
  if (!dladdr(reinterpret_cast<void *>(&dpmd_create_pair), &self) || !self.dli_fname) return "";
  std::string dir = self.dli_fname;
  auto slash = dir.find_last_of('/');
  dir = slash == std::string::npos ? "." : dir.substr(0, slash);
  std::ifstream in(dir + "/dpmd_ops_library.path");
  std::string path;
  std::getline(in, path);
  return path;
}

// metadata["ops_library"] == true: the model's code calls torch.ops.dpmd.* kernels
bool needs_ops_library(const std::string &metadata)
{
  auto pos = metadata.find("\"ops_library\"");
  if (pos == std::string::npos) return false;
  pos = metadata.find(':', pos);
  if (pos == std::string::npos) return false;
  pos = metadata.find_first_not_of(" \t\r\n", pos + 1);
  return pos != std::string::npos && metadata.compare(pos, 4, "true") == 0;
}

}    // namespace

PairDPMD::PairDPMD(LAMMPS *lmp) : Pair(lmp)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  no_virial_fdotr_compute = 1;    // the model returns the virial itself
  centroidstressflag = CENTROID_NOTAVAIL;
  comm_reverse = 0;
  // TorchScript's profiling optimiser makes the first calls seconds slower and the steady state of this
  // model ~25 % slower than the plain interpreter (measured with benchmarks/lammps_speed.py's model)
  torch::jit::setGraphExecutorOptimize(false);
}

PairDPMD::~PairDPMD()
{
  if (devi_fp) fclose(devi_fp);
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

void PairDPMD::allocate()
{
  allocated = 1;
  int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  memory->create(cutsq, n, n, "pair:cutsq");
  for (int i = 0; i < n; i++)
    for (int j = 0; j < n; j++) setflag[i][j] = 0;
}

/* ---------------------------------------------------------------------- */

void PairDPMD::settings(int narg, char **arg)
{
  if (narg < 1)
    error->all(FLERR, "{}", "Illegal pair_style dpmd command: expected pair_style dpmd model.pth [model2.pth ...] "
                            "[out_freq N] [out_file FILE] [atomic] [relative EPS] [fparam V1 ...] [aparam V1 ...] "
                            "[device auto|cpu|cuda]");
  models.clear();
  if (devi_fp) fclose(devi_fp);
  devi_fp = nullptr;
  last_devi_step = -1;
  out_freq = 100;
  out_file = "model_devi.out";
  atomic = relative = false;
  relative_eps = 0.0;
  fparam.clear();
  aparam.clear();
  device_kind = "auto";

  int iarg = 0;
  std::vector<std::string> paths;
  while (iarg < narg && !is_keyword(arg[iarg])) {
    std::string path = arg[iarg++];
    if (!file_exists(path)) {
      if (path.find('.') == std::string::npos)
        error->all(FLERR, "pair_style dpmd: '{}' is neither a model file nor a keyword ({})", path, KEYWORDS);
      error->all(FLERR, "pair_style dpmd: model file {} not found", path);
    }
    paths.push_back(path);
  }
  if (paths.empty()) error->all(FLERR, "{}", "pair_style dpmd: the first argument must be a model file");
  // the keywords first, so that the models load onto the device asked for; fparam / aparam take the numbers
  // that follow them, checked against the models' counts once these are loaded
  bool fparam_given = false, aparam_given = false;
  while (iarg < narg) {
    std::string key = arg[iarg];
    if (key == "out_freq") {
      if (iarg + 1 >= narg) error->all(FLERR, "{}", "pair_style dpmd: out_freq needs a value (steps)");
      out_freq = utils::inumeric(FLERR, arg[iarg + 1], false, lmp);
      if (out_freq <= 0) error->all(FLERR, "pair_style dpmd: out_freq must be a positive integer, got {}", out_freq);
      iarg += 2;
    } else if (key == "out_file") {
      if (iarg + 1 >= narg) error->all(FLERR, "{}", "pair_style dpmd: out_file needs a file name");
      out_file = arg[iarg + 1];
      iarg += 2;
    } else if (key == "atomic") {
      atomic = true;
      iarg += 1;
    } else if (key == "relative") {
      if (iarg + 1 >= narg) error->all(FLERR, "{}", "pair_style dpmd: relative needs a value (eV/Å)");
      relative = true;
      relative_eps = utils::numeric(FLERR, arg[iarg + 1], false, lmp);
      if (relative_eps < 0.0) error->all(FLERR, "pair_style dpmd: relative must be >= 0, got {}", relative_eps);
      iarg += 2;
    } else if (key == "device") {
      if (iarg + 1 >= narg || (strcmp(arg[iarg + 1], "auto") && strcmp(arg[iarg + 1], "cpu") &&
                               strcmp(arg[iarg + 1], "cuda")))
        error->all(FLERR, "pair_style dpmd: device needs auto, cpu or cuda, got '{}'",
                   iarg + 1 < narg ? arg[iarg + 1] : "");
      device_kind = arg[iarg + 1];
      iarg += 2;
    } else if (key == "fparam" || key == "aparam") {
      auto &values = key == "fparam" ? fparam : aparam;
      (key == "fparam" ? fparam_given : aparam_given) = true;
      values.clear();
      for (iarg++; iarg < narg && utils::is_double(arg[iarg]); iarg++)
        values.push_back(utils::numeric(FLERR, arg[iarg], false, lmp));
    } else if (key == "fparam_from_compute" || key == "fparam_from_fix" || key == "aparam_from_compute" ||
               key == "ttm") {
      error->all(FLERR, "pair_style dpmd: {} is not supported; give constant values with fparam V1 ... / aparam "
                        "V1 ...", key);
    } else {
      error->all(FLERR, "pair_style dpmd: unknown keyword '{}' (expected {}); model files come first", key,
                 KEYWORDS);
    }
  }

  select_device();
  for (const auto &path : paths) load_model(path);
  // as DeePMD-kit: exactly the model's numb_fparam (numb_aparam) values
  auto check_count = [this](const char *key, bool given, const std::vector<double> &values, int dim) {
    if (!given) return;
    if (dim == 0)
      error->all(FLERR, "pair_style dpmd: {} given, but {} takes none (numb_{} = 0)", key, models[0].path, key);
    if (static_cast<int>(values.size()) != dim)
      error->all(FLERR, "pair_style dpmd: {} needs {} value(s) ({}'s numb_{}), got {}", key, dim, models[0].path,
                 key, values.size());
  };
  check_count("fparam", fparam_given, fparam, models[0].dim_fparam);
  check_count("aparam", aparam_given, aparam, models[0].dim_aparam);
  check_params();
  auto on_device = [this](const std::vector<double> &v) {
    return v.empty() ? torch::Tensor() : torch::tensor(v, torch::kFloat64).to(device);
  };
  fparam_t = on_device(fparam);
  aparam_t = on_device(aparam);
  rcut_max = 0.0;
  for (const auto &m : models) rcut_max = std::max(rcut_max, m.rcut);
  cutforce = rcut_max;
  comm_reverse = models.size() > 1 ? 3 * static_cast<int>(models.size()) : 0;

  if (comm->me == 0) {
    utils::logmesg(lmp, "pair_style dpmd: {} model(s), rcut {} Å, type_map", models.size(), rcut_max);
    for (const auto &t : models[0].type_map) utils::logmesg(lmp, " {}", t);
    utils::logmesg(lmp, ", on {}{}\n", device.str(), comm->nprocs > 1 && device.is_cuda() ? " (rank 0)" : "");
  }
}

// The rank's device: the GPU of its node-local rank (modulo the node's GPU count, as DeePMD-kit picks it)
// when libtorch sees a GPU and the device keyword is not cpu.
void PairDPMD::select_device()
{
  device = torch::kCPU;
  if (device_kind == "cpu") return;
  int node_rank = comm->me;
#if defined(MPI_COMM_TYPE_SHARED) || MPI_VERSION >= 3    // (old serial MPI stubs lack it: one rank)
  MPI_Comm node;
  MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, comm->me, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &node_rank);
  MPI_Comm_free(&node);
#endif
  const bool here = torch::cuda::is_available();
  int mine = here ? 1 : 0, everywhere = 0;    // every rank reaches the same verdict (no rank left waiting)
  MPI_Allreduce(&mine, &everywhere, 1, MPI_INT, MPI_MIN, world);
  if (device_kind == "cuda" && !everywhere) {
    // libtorch_cuda is loaded when this libtorch is a CUDA build (the plugin links it)
    const bool built = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD) != nullptr;
    error->all(FLERR, "pair_style dpmd: device cuda, but {}; use device auto or cpu",
               built ? "libtorch sees no GPU on some rank (CUDA_VISIBLE_DEVICES, driver)"
                     : "this libtorch has no CUDA (a CPU build of PyTorch)");
  }
  if (here) device = torch::Device(torch::kCUDA,
                                     static_cast<c10::DeviceIndex>(node_rank % torch::cuda::device_count()));
}

void PairDPMD::load_model(const std::string &path)
{
  Model model;
  model.path = path;
  std::string metadata;
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    for (const auto &record : reader.getAllRecords()) {
      const std::string suffix = std::string("extra/") + METADATA_FILE;
      if (record.size() >= suffix.size() && record.compare(record.size() - suffix.size(), suffix.size(), suffix) == 0) {
        auto data = reader.getRecord(record);
        metadata.assign(static_cast<const char *>(std::get<0>(data).get()), std::get<1>(data));
      }
    }
  } catch (const std::exception &err) {
    error->all(FLERR, "pair_style dpmd: {}: not a frozen dpmd model (not a TorchScript archive: {})", path,
               torch_message(err));
  }
  if (metadata.empty())
    error->all(FLERR, "pair_style dpmd: {}: no {} in the archive: not a frozen dpmd model (write one with dpmd freeze)",
               path, METADATA_FILE);

  if (needs_ops_library(metadata)) {
    std::string lib = ops_library_path();
    if (lib.empty())
      error->all(FLERR, "pair_style dpmd: {} needs dpmd's kernel library: run `dpmd build-lammps-plugin` (which "
                        "builds it) or set DPMD_OPS_LIBRARY to the path `dpmd build-ops` prints", path);
    if (!dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL | RTLD_DEEPBIND))
      error->all(FLERR, "pair_style dpmd: cannot load the kernel library {} (needed by {}): {}", lib, path,
                 dlerror());
  }

  try {
    torch::jit::ExtraFilesMap extra{{METADATA_FILE, ""}};
    model.module = torch::jit::load(path, device, extra);
    model.module.eval();
    auto types = model.module.get_method("get_type_map")(std::vector<c10::IValue>{}).toList();
    for (const auto &t : types) model.type_map.push_back(static_cast<c10::IValue>(t).toStringRef());
    model.rcut = model.module.get_method("get_rcut")(std::vector<c10::IValue>{}).toDouble();
    if (model.module.find_method("get_dim_fparam")) {
      model.dim_fparam = model.module.get_method("get_dim_fparam")(std::vector<c10::IValue>{}).toInt();
      model.dim_aparam = model.module.get_method("get_dim_aparam")(std::vector<c10::IValue>{}).toInt();
      model.has_default_fparam = model.module.get_method("has_default_fparam")(std::vector<c10::IValue>{}).toBool();
    }
  } catch (const std::exception &err) {
    error->all(FLERR, "pair_style dpmd: cannot load {}: {}", path, torch_message(err));
  }
  models.push_back(std::move(model));
}

// Every model takes the fparam / aparam given (one set of values for all models, so their counts must agree).
void PairDPMD::check_params()
{
  for (const auto &m : models) {
    if (m.dim_fparam != models[0].dim_fparam || m.dim_aparam != models[0].dim_aparam)
      error->all(FLERR, "pair_style dpmd: {} takes {} fparam and {} aparam value(s), {} takes {} and {}: the models "
                        "must agree", m.path, m.dim_fparam, m.dim_aparam, models[0].path, models[0].dim_fparam,
                 models[0].dim_aparam);
    if (m.dim_fparam > 0 && fparam.empty() && !m.has_default_fparam)
      error->all(FLERR, "pair_style dpmd: {} takes {} fparam value(s) per frame (numb_fparam) and has no "
                        "default_fparam: add fparam V1 ... to the pair_style line", m.path, m.dim_fparam);
    if (m.dim_aparam > 0 && aparam.empty())
      error->all(FLERR, "pair_style dpmd: {} takes {} aparam value(s) per atom (numb_aparam): add aparam V1 ... to "
                        "the pair_style line", m.path, m.dim_aparam);
  }
}

void PairDPMD::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  int ntypes = atom->ntypes;
  std::vector<std::string> elements(arg + 2, arg + narg);
  if (narg == 2) {   // bare `pair_coeff * *` (DeePMD-kit, DP-GEN): atom type t is type_map[t-1] of the first model
    const auto &type_map = models[0].type_map;
    if (ntypes > static_cast<int>(type_map.size()))
      error->all(FLERR, "pair_coeff * * for dpmd: the box has {} atom types but the type_map of {} has {} ({}); "
                        "name the element of each type: pair_coeff * * <element per type>",
                 ntypes, models[0].path, type_map.size(), utils::join_words(type_map, " "));
    elements.assign(type_map.begin(), type_map.begin() + ntypes);
    if (comm->me == 0)
      utils::logmesg(lmp, "pair_coeff * *: atom types 1-{} are {} (the model's type_map, in order)\n", ntypes,
                     utils::join_words(elements, " "));
  } else if (narg != 2 + ntypes) {
    error->all(FLERR, "pair_coeff for dpmd: expected 'pair_coeff * * ' followed by one element name for each of the "
                      "{} atom types (e.g. pair_coeff * * O H), got {} element name(s)", ntypes, narg - 2);
  }
  for (auto &model : models) {
    model.lmp_to_model.assign(ntypes + 1, -1);
    for (int t = 1; t <= ntypes; t++) {
      const std::string &element = elements[t - 1];
      auto found = std::find(model.type_map.begin(), model.type_map.end(), element);
      if (found == model.type_map.end())
        error->all(FLERR, "pair_coeff for dpmd: element {} (atom type {}) is not in the type_map of {} ({})", element,
                   t, model.path, utils::join_words(model.type_map, " "));
      model.lmp_to_model[t] = static_cast<int>(found - model.type_map.begin());
    }
    model.type_index = torch::tensor(std::vector<int64_t>(model.lmp_to_model.begin(), model.lmp_to_model.end()),
                                     torch::kInt64).to(device);
  }
  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++) setflag[i][j] = 1;
}

void PairDPMD::init_style()
{
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR, "pair_style dpmd: units {} are not supported: dpmd models use metal units (eV, Å); "
                      "use 'units metal'", update->unit_style);
  if (!force->newton_pair)
    error->all(FLERR, "{}", "pair_style dpmd requires newton pair on (forces on ghost atoms go back to their owners "
                            "by reverse communication): remove 'newton off'");
  if (models.empty() || models[0].lmp_to_model.empty())
    error->all(FLERR, "{}", "pair_style dpmd: pair_coeff * * <element per type> is missing");
  neighbor->add_request(this, NeighConst::REQ_FULL);
  if (models.size() > 1 && comm->me == 0 && !devi_fp) open_devi_file();
}

double PairDPMD::init_one(int i, int j)
{
  if (setflag[i][j] == 0) error->all(FLERR, "{}", "pair dpmd: all pair coeffs are not set");
  return rcut_max;
}

void PairDPMD::open_devi_file()
{
  devi_fp = fopen(out_file.c_str(), "w");
  if (!devi_fp) error->one(FLERR, "pair_style dpmd: cannot open {} for writing: {}", out_file, utils::getsyserror());
  // DeePMD-kit's columns (dpmd.md.devi), then devi_e, then per-atom force deviations with `atomic`
  const char *columns[] = {"max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f",
                           "min_devi_f", "avg_devi_f", "devi_e"};
  fprintf(devi_fp, "#%11s", "step");
  for (const char *c : columns) fprintf(devi_fp, "%19s", c);
  fprintf(devi_fp, "\n");
  fflush(devi_fp);
}

/* ---------------------------------------------------------------------- */

// n values at data as a tensor on the device: on the CPU the data itself (no copy); on a GPU one copy through
// `stage`, a pinned host buffer reused every step (the previous step's copy has finished: its outputs came back)
torch::Tensor PairDPMD::upload(torch::Tensor &stage, const void *data, int64_t n, torch::ScalarType dtype)
{
  if (!device.is_cuda()) return torch::from_blob(const_cast<void *>(data), {n}, dtype);
  if (!stage.defined() || stage.numel() < n)
    stage = torch::empty({n + n / 4 + 64}, torch::TensorOptions().dtype(dtype).pinned_memory(true));
  auto host = stage.narrow(0, 0, n);
  if (n > 0) std::memcpy(host.data_ptr(), data, static_cast<size_t>(n) * host.element_size());
  return host.to(device, /*non_blocking=*/true);
}

// One model on the step's inputs (on the device); its outputs back on the host in one copy:
// [energy, virial (9, row-major), force (3 nall), atom_energy (nlocal; if asked), atom_virial (9 nall; if asked)]
torch::Tensor PairDPMD::evaluate(Model &model, const torch::Tensor &coord, const torch::Tensor &type, int nlocal,
                                 const torch::Tensor &center, const torch::Tensor &neighbor, bool atom_energy,
                                 bool atom_virial)
{
  try {
    c10::OptionalDeviceGuard guard;    // the model's own allocations on this rank's GPU
    if (device.is_cuda()) guard.reset_device(device);
    auto atype = model.type_index.index_select(0, type);
    std::vector<c10::IValue> inputs{coord, atype, c10::IValue(), center, neighbor, c10::IValue(),
                                    static_cast<int64_t>(nlocal), atom_virial};
    if (model.dim_fparam > 0 || model.dim_aparam > 0) {    // (models without them: the 8-argument forward)
      inputs.push_back(fparam_t.defined() ? c10::IValue(fparam_t) : c10::IValue());
      inputs.push_back(aparam_t.defined() ? c10::IValue(aparam_t) : c10::IValue());    // the same for every atom
    }
    auto out = model.module.forward(inputs).toGenericDict();
    auto get = [&out](const char *key) { return out.at(key).toTensor().reshape(-1); };
    std::vector<torch::Tensor> parts{get("energy"), get("virial"), get("force")};
    if (atom_energy) parts.push_back(get("atom_energy").narrow(0, 0, nlocal));
    if (atom_virial) parts.push_back(get("atom_virial"));
    return torch::cat(parts).to(torch::kCPU, torch::kFloat64);
  } catch (const std::exception &err) {
    std::string message = torch_message(err);
    int i = -1;    // the model names atoms by local index: add LAMMPS's atom ID
    if (sscanf(message.c_str(), "atom %d ", &i) == 1 && i >= 0 && i < nlocal)
      message += fmt::format(" (LAMMPS atom ID {})", atom->tag[i]);
    error->one(FLERR, "pair dpmd: {}: {}", model.path, message);
  }
}

void PairDPMD::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  double **x = atom->x;
  double **f = atom->f;
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const int nmodels = static_cast<int>(models.size());
  const bool devi_step = nmodels > 1 && update->ntimestep % out_freq == 0 && update->ntimestep != last_devi_step;

  // edges (centre, neighbour) from local centres to any atom within rcut (the list carries LAMMPS's skin)
  std::vector<int64_t> edges;
  const double rc2 = rcut_max * rcut_max;
  for (int ii = 0; ii < list->inum; ii++) {
    const int i = list->ilist[ii];
    const int *jlist = list->firstneigh[i];
    for (int jj = 0; jj < list->numneigh[i]; jj++) {
      const int j = jlist[jj] & NEIGHMASK;
      const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz < rc2) {
        edges.push_back(i);
        edges.push_back(j);
      }
    }
  }
  const int64_t nedges = static_cast<int64_t>(edges.size()) / 2;

  std::vector<torch::Tensor> forces;
  std::vector<double> virials, energies;
  torch::Tensor coord, type, center, neighbor;
  if (nlocal > 0) {    // one copy each of the positions, the types and the edges, shared by every model
    coord = upload(stage_coord, x[0], 3 * static_cast<int64_t>(nall), torch::kFloat64).view({nall, 3});
    type = upload(stage_type, atom->type, nall, torch::kInt32);
    auto pairs = upload(stage_edge, edges.data(), 2 * nedges, torch::kInt64).view({nedges, 2}).t();
    center = pairs[0].contiguous();
    neighbor = pairs[1].contiguous();
  }
  for (int m = 0; m < (devi_step ? nmodels : 1); m++) {
    if (nlocal == 0) {    // nothing to evaluate on this rank; it still takes part in the communication
      forces.push_back(torch::zeros({3 * static_cast<int64_t>(nall)}, torch::kFloat64));
      virials.insert(virials.end(), 9, 0.0);
      energies.push_back(0.0);
      continue;
    }
    const bool first = m == 0;
    auto out = evaluate(models[m], coord, type, nlocal, center, neighbor, first && eflag_atom, first && vflag_atom);
    const double *o = out.data_ptr<double>();
    const double *v = o + 1, *fm = o + 10;
    forces.push_back(out.narrow(0, 10, 3 * static_cast<int64_t>(nall)));
    virials.insert(virials.end(), v, v + 9);
    energies.push_back(o[0]);
    if (!first) continue;

    for (int i = 0; i < nall; i++)
      for (int k = 0; k < 3; k++) f[i][k] += fm[3 * i + k];
    if (eflag_global) eng_vdwl += energies[0];
    const double *e = fm + 3 * static_cast<size_t>(nall);    // atom_energy, when asked
    if (eflag_atom)
      for (int i = 0; i < nlocal; i++) eatom[i] += e[i];
    // DeePMD's virial is row-major W[a][b] = sum r_a f_b; LAMMPS stores xx yy zz xy xz yz
    if (vflag_global) {
      virial[0] += v[0];
      virial[1] += v[4];
      virial[2] += v[8];
      virial[3] += v[1];
      virial[4] += v[2];
      virial[5] += v[5];
    }
    if (vflag_atom) {
      const double *w = e + (eflag_atom ? nlocal : 0);
      for (int i = 0; i < nall; i++) {
        vatom[i][0] += w[9 * i + 0];
        vatom[i][1] += w[9 * i + 4];
        vatom[i][2] += w[9 * i + 8];
        vatom[i][3] += w[9 * i + 1];
        vatom[i][4] += w[9 * i + 2];
        vatom[i][5] += w[9 * i + 5];
      }
    }
  }
  if (devi_step) {
    write_deviation(forces, virials, energies, nlocal, nall);
    last_devi_step = update->ntimestep;
  }
}

/* ---------------------------------------------------------------------- */

int PairDPMD::pack_reverse_comm(int n, int first, double *buf)
{
  const int w = 3 * comm_models;
  int m = 0;
  for (int i = first; i < first + n; i++)
    for (int k = 0; k < w; k++) buf[m++] = model_forces[static_cast<size_t>(i) * w + k];
  return m;
}

void PairDPMD::unpack_reverse_comm(int n, int *list, double *buf)
{
  const int w = 3 * comm_models;
  int m = 0;
  for (int i = 0; i < n; i++)
    for (int k = 0; k < w; k++) model_forces[static_cast<size_t>(list[i]) * w + k] += buf[m++];
}

// DeePMD-kit's model deviation (dpmd.md.devi), reduced over all ranks.
void PairDPMD::write_deviation(const std::vector<torch::Tensor> &forces, const std::vector<double> &virials,
                               const std::vector<double> &energies, int nlocal, int nall)
{
  const int nm = static_cast<int>(forces.size());
  comm_models = nm;
  const int w = 3 * nm;
  model_forces.assign(static_cast<size_t>(std::max(nall, 1)) * w, 0.0);
  for (int m = 0; m < nm; m++) {
    const double *fm = forces[m].data_ptr<double>();
    for (int i = 0; i < nall; i++)
      for (int k = 0; k < 3; k++) model_forces[static_cast<size_t>(i) * w + 3 * m + k] = fm[3 * i + k];
  }
  comm->reverse_comm(this);    // ghost forces of every model to their owners

  std::vector<double> devi_atom(nlocal);
  double fmax = 0.0, fmin = INFINITY, fsum = 0.0;
  for (int i = 0; i < nlocal; i++) {
    const double *fi = &model_forces[static_cast<size_t>(i) * w];
    double var = 0.0, mean_norm2 = 0.0;
    for (int k = 0; k < 3; k++) {
      double mean = 0.0;
      for (int m = 0; m < nm; m++) mean += fi[3 * m + k];
      mean /= nm;
      double s = 0.0;
      for (int m = 0; m < nm; m++) s += (fi[3 * m + k] - mean) * (fi[3 * m + k] - mean);
      var += s / nm;
      mean_norm2 += mean * mean;
    }
    double d = std::sqrt(var);
    if (relative) d /= std::sqrt(mean_norm2) + relative_eps;
    devi_atom[i] = d;
    fmax = std::max(fmax, d);
    fmin = std::min(fmin, d);
    fsum += d;
  }
  double gmax, gmin, gsum;
  MPI_Allreduce(&fmax, &gmax, 1, MPI_DOUBLE, MPI_MAX, world);
  MPI_Allreduce(&fmin, &gmin, 1, MPI_DOUBLE, MPI_MIN, world);
  MPI_Allreduce(&fsum, &gsum, 1, MPI_DOUBLE, MPI_SUM, world);
  std::vector<double> vir(9 * nm), ener(nm);
  MPI_Allreduce(virials.data(), vir.data(), 9 * nm, MPI_DOUBLE, MPI_SUM, world);
  MPI_Allreduce(energies.data(), ener.data(), nm, MPI_DOUBLE, MPI_SUM, world);

  const double natoms = static_cast<double>(atom->natoms);
  auto std_of = [nm](const double *values, int stride) {
    double mean = 0.0, s = 0.0;
    for (int m = 0; m < nm; m++) mean += values[m * stride];
    mean /= nm;
    for (int m = 0; m < nm; m++) s += (values[m * stride] - mean) * (values[m * stride] - mean);
    return std::sqrt(s / nm);
  };
  for (auto &v : vir) v /= natoms;
  for (auto &e : ener) e /= natoms;
  double vmax = 0.0, vmin = INFINITY, vsq = 0.0;
  for (int c = 0; c < 9; c++) {
    double s = std_of(&vir[c], 9);
    vmax = std::max(vmax, s);
    vmin = std::min(vmin, s);
    vsq += s * s;
  }
  const double devi_e = std_of(ener.data(), 1);

  // per-atom deviations in tag order (rank 0 gathers)
  std::vector<std::pair<tagint, double>> per_atom;
  if (atomic) {
    std::vector<double> mine(2 * nlocal);
    for (int i = 0; i < nlocal; i++) {
      mine[2 * i] = static_cast<double>(atom->tag[i]);
      mine[2 * i + 1] = devi_atom[i];
    }
    int count = 2 * nlocal;
    std::vector<int> counts(comm->nprocs), displs(comm->nprocs);
    MPI_Gather(&count, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, world);
    int total = 0;
    for (int p = 0; p < comm->nprocs; p++) {
      displs[p] = total;
      total += counts[p];
    }
    std::vector<double> all(comm->me == 0 ? std::max(total, 1) : 1);
    MPI_Gatherv(mine.data(), count, MPI_DOUBLE, all.data(), counts.data(), displs.data(), MPI_DOUBLE, 0, world);
    if (comm->me == 0) {
      for (int k = 0; k < total; k += 2) per_atom.emplace_back(static_cast<tagint>(all[k]), all[k + 1]);
      std::sort(per_atom.begin(), per_atom.end());
    }
  }

  if (comm->me == 0 && devi_fp) {
    fprintf(devi_fp, "%12lld", static_cast<long long>(update->ntimestep));
    const double row[] = {vmax, vmin, std::sqrt(vsq) / 3.0, gmax, gmin, gsum / natoms, devi_e};
    for (double value : row) fprintf(devi_fp, "%19.6e", value);
    for (const auto &entry : per_atom) fprintf(devi_fp, "%19.6e", entry.second);
    fprintf(devi_fp, "\n");
    fflush(devi_fp);
  }
}

// entry point for dpmd_plugin.cpp, which opens this library with RTLD_DEEPBIND
extern "C" void *dpmd_create_pair(void *lmp)
{
  return new PairDPMD(static_cast<LAMMPS *>(lmp));
}

